"""The one partitions definition: one partition per ``image_directory`` entity id."""

from dagster import DynamicPartitionsDefinition

image_directory_partitions = DynamicPartitionsDefinition(name="image_directory")
