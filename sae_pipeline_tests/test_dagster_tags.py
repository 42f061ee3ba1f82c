"""Pins the Dagster tag strings this project hard-codes to Dagster's own, so an upgrade that renames them fails here."""

from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from sae_pipeline.defs.schedules import RANGE_END_TAG, RANGE_START_TAG


def test_range_tags_equal_dagsters() -> None:
    assert (RANGE_START_TAG, RANGE_END_TAG) == (ASSET_PARTITION_RANGE_START_TAG, ASSET_PARTITION_RANGE_END_TAG)
