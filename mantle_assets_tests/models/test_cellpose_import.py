import json
import os
import subprocess
import sys

# Counts, in a fresh interpreter, how often a function cellpose.dynamics compiles at import came
# from numba's on-disk cache.
CACHE_USE = """
import json
from mantle_assets.models.cellpose_import import import_cellpose
import_cellpose()
import cellpose.dynamics
stats = cellpose.dynamics._extend_centers.stats
print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values())}))
"""


def import_in_fresh_process(mantle_home) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | {"MANTLE_HOME": str(mantle_home)}
    output = subprocess.run([sys.executable, "-c", CACHE_USE], env=env, check=True, capture_output=True, text=True)
    return json.loads(output.stdout.splitlines()[-1])


def test_second_process_loads_cellpose_compiled_code_from_the_cache(mantle_home):
    assert import_in_fresh_process(mantle_home) == {"hits": 0, "misses": 1}
    assert any((mantle_home / "numba-cache").iterdir())
    assert import_in_fresh_process(mantle_home) == {"hits": 1, "misses": 0}
