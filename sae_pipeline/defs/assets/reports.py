"""The reports: `sweep_analysis` (the sweep report from every finished partition) and `calibration`."""


import dagster as dg

from sae_pipeline.analysis import ReportView, build_sweep_report, report_with_inline_plots
from sae_pipeline.calibration import calibration_png, calibration_state, how_to_calibrate, plans_markdown
from sae_pipeline.check_matrix import check_matrix, matrix_markdown, matrix_ui_markdown, worst_verdicts
from sae_pipeline.defs.assets.interpretation import features
from sae_pipeline.defs.assets.training import sae
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.defs.resources import StorageResource
from sae_pipeline.defs.stops import stops_without_retry
from sae_pipeline.markdown import report_pieces, rounded
from sae_pipeline.plots import png_markdown
from sae_pipeline.registry import sweeps_dir
from sae_pipeline.results import collect_runs, training_logs
from sae_pipeline.storage import (
    write_bytes_atomic,
    write_json_atomic,
)


@dg.asset(deps=[sae, features], group_name="analysis", kinds={"markdown"},
          description="The sweep report (seed 004's form) over every finished config partition, opening with "
                      "the check matrix (every partition against every sae and features check); the `report` "
                      "metadata holds it whole: the text in place, its tables at most 7 columns wide (each config "
                      "by its short label; the key table and report.md give the keys, report.md every column), "
                      "each plot behind its \"[Show Markdown]\" link (Dagster's for values over 1,000 "
                      "characters).")
def sweep_analysis(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    with stops_without_retry(context, storage.layout):
        layout = storage.layout
        keys = context.instance.get_dynamic_partitions(sae_configs.name)
        logs = training_logs(layout, keys)
        runs, missing = collect_runs(layout, keys, logs)
        matrix = check_matrix(layout, keys)
        ui = ReportView(compact=True, labels=dict(zip(matrix["key"], matrix["config"], strict=True)),
                        verdicts=worst_verdicts(matrix), check_matrix=matrix_ui_markdown(matrix))
        with layout.publish(layout.analysis_dir) as folder:
            report = build_sweep_report(runs, folder, sweep_name="sae_configs", missing=missing, training_logs=logs,
                                        check_matrix=matrix_markdown(matrix), ui=ui)
            text = report_with_inline_plots(report)
        where = layout.location(layout.analysis_dir)
        return dg.MaterializeResult(metadata={
            **report_metadata(text),
            "report_path": dg.MetadataValue.path(f"{where}/{report.report_path.name}"),
            "table_path": dg.MetadataValue.path(f"{where}/{report.table_path.name}"),
            "n_configs": report.n_configs, "n_missing": len(missing), "failed_blocking_checks": list(report.failed),
            "best_balanced": report.best_balanced or "none",
            "top_configs": dg.MetadataValue.md(report.top_markdown),
            "pareto_l0_dead": list(report.pareto_dead),
            **({"seed_consistency": report.seed_consistency} if report.seed_consistency else {}),
        })


def report_metadata(text: str) -> dict[str, dg.MetadataValue]:
    """The report as numbered markdown entries, one per section and plot (`markdown.report_pieces`): the text
    sections show in place on the asset page, where one entry for the whole report would be a link."""
    return {f"report {number:02d}: {title}": dg.MetadataValue.md(piece)
            for number, (title, piece) in enumerate(report_pieces(text), 1)}


@dg.asset(deps=[sweep_analysis], group_name="analysis", kinds={"markdown"},
          description="l1_alpha calibration toward target_l0 for relu configs: fitted points and the next proposal.")
def calibration(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    with stops_without_retry(context, storage.layout):
        layout = storage.layout
        states = calibration_state(layout)
        plans = [plan for state in states for plan in state.plans]
        sections, proposals, pngs = [], {}, {}
        for state in states:
            for plan in state.plans:
                png = pngs[f"{plan.group}.png"] = calibration_png(plan, state.settings.tolerance)
                proposals[plan.group] = {"sweep": state.sweep.path.name, "status": plan.status, "reason": plan.reason,
                                         "target_l0": plan.target, "n_proposed": plan.n_proposed,
                                         "proposed_l1_alpha": plan.proposal.l1_alpha,
                                         "proposed_key": plan.config.partition_key() if plan.config else None,
                                         "points": [[p.key, p.l1_alpha, p.l0] for p in plan.points]}
                sections.append(plans_markdown([plan]) + "\n\n" + png_markdown(png, f"L0 vs l1_alpha {plan.group}"))
        empty = how_to_calibrate(sweeps_dir(layout)) if not plans else None
        report = "# l1_alpha calibration\n\n" + ("\n\n".join(sections) or empty)
        with layout.publish(layout.calibration_dir) as folder:
            for name, png in pngs.items():
                write_bytes_atomic(folder / name, png)
            write_json_atomic(folder / "proposals.json", proposals)
            write_bytes_atomic(folder / "report.md", report.encode())
        context.log.info(f"calibration: {len(plans)} base configs, statuses {[p.status for p in plans]}")
        return dg.MaterializeResult(metadata={
            "report_path": dg.MetadataValue.path(layout.location(layout.calibration_dir, "report.md")),
            "n_groups": len(plans), "statuses": {p.group: p.status for p in plans},
            "proposals": rounded(proposals),
            "fitted_points": dg.MetadataValue.md(empty or plans_markdown(plans)),
            "plot": dg.MetadataValue.md("\n\n".join(sections) if sections else "no calibrated config"),
        })
