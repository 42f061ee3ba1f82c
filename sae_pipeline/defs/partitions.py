"""One partition per SAE configuration; keys are registered from sweep specs (see `sae-pipeline register-sweep`)."""

import dagster as dg

sae_configs = dg.DynamicPartitionsDefinition(name="sae_configs")


def key_ranges(ordered: list[str], wanted: set[str], size: int) -> list[list[str]]:
    """The keys of `wanted` as ranges of consecutive keys in `ordered` (the partition order) of at most `size`:
    the partitions one ranged run can cover."""
    ranges: list[list[str]] = []
    current: list[str] = []
    for key in ordered:
        if key in wanted and len(current) < size:
            current.append(key)
            continue
        if current:
            ranges.append(current)
        current = [key] if key in wanted else []
    return [*ranges, current] if current else ranges
