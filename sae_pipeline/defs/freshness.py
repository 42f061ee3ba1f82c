"""Whether an asset (partition) is current: Dagster's own stale status, as the UI shows it.

A materialisation is current when the asset's code version and its upstream data versions (corpus: its
sha256; activations: its meta.json's) are those it was made with. Dagster exposes the resolver only through
internal modules; this file is the one place that imports them.
"""

from __future__ import annotations

import dagster as dg
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._time import get_current_datetime


def stale_resolver(instance: dg.DagsterInstance, defs: dg.Definitions) -> CachingStaleStatusResolver:
    """A resolver over `defs`' asset graph; build a new one after materialising (it caches)."""
    graph = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)
    return CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)


def is_current(resolver: CachingStaleStatusResolver, asset: str, partition_key: str | None = None) -> bool:
    """Materialised, and neither its code version nor an upstream data version changed since."""
    return resolver.get_status(dg.AssetKey(asset), partition_key) == StaleStatus.FRESH


def stale_causes(resolver: CachingStaleStatusResolver, asset: str, partition_key: str | None = None) -> list[str]:
    """Why an asset is stale, in Dagster's words (empty when it is current or never materialised)."""
    causes = resolver.get_stale_causes(dg.AssetKey(asset), partition_key)
    return [f"{cause.key.asset_key.to_user_string()}: {cause.reason}"
            + (f" ({cause.dependency.asset_key.to_user_string()})" if cause.dependency else "") for cause in causes]
