"""End-of-training reports, selected by ``eval.report`` (e.g. ``digits`` in configs/digits.yaml,
``digits-text`` in configs/digits-text.yaml).

A report judges the final EMA model and returns a JSON-able dict (written to
``RUN_DIR/eval/<report>.json`` by training) plus the lines the command line prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fmgen.config import Config, ConfigError
from fmgen.eval.digits import digits_report, digits_report_lines
from fmgen.eval.digits_text import digits_text_report, digits_text_report_lines
from fmgen.eval.features import (
    FEATURE_DIMS,
    FEATURE_TRAINED_ON,
    EvalError,
    check_trained_on,
    parse_feature_network,
)


@dataclass(frozen=True)
class Report:
    """``run(model, path, cfg, *, autoencoder, device) -> dict``; ``lines(result) -> [str]``.

    ``data_sources``: the ``data.source`` values the report can judge (empty: any).
    ``text``: True = text models only (``model.text_encoder`` set), False = models without
    text only, None = any.
    """

    name: str
    run: Callable[..., dict[str, Any]]
    lines: Callable[[dict[str, Any]], list[str]]
    data_sources: tuple[str, ...] = ()
    text: bool | None = None


REPORTS: dict[str, Report] = {
    # digits draws its guided samples per class label: a text model has none
    "digits": Report("digits", digits_report, digits_report_lines, ("digits",), text=False),
    "digits-text": Report(
        "digits-text", digits_text_report, digits_text_report_lines, ("digits",), text=True
    ),
}


def check_eval_config(cfg: Config) -> None:
    """The eval options whose registries live in this layer."""
    from fmgen.data.reference import data_set_name

    e = cfg.eval
    try:
        kind = parse_feature_network(e.feature_network, e.feature_network_path).kind
        if e.fid_every_images:  # FID during training: refuse a network for other data now
            check_trained_on(kind, FEATURE_TRAINED_ON.get(kind), data_set_name(cfg.data),
                             where=str(cfg.data.path), force=e.force_feature_network)  # fmt: skip
    except EvalError as err:
        raise ConfigError(str(err)) from None
    dim = FEATURE_DIMS.get(kind)
    if cfg.eval.fid_every_images and dim is not None and cfg.eval.fid_num_samples <= dim:
        raise ConfigError(
            f"eval.fid_num_samples={cfg.eval.fid_num_samples}: FID with the {dim}-d "
            f"{cfg.eval.feature_network} features needs more samples than {dim} (the covariance "
            f"is singular otherwise); raise it or set eval.fid_every_images=0"
        )
    if not cfg.eval.report:
        return
    if cfg.eval.report not in REPORTS:
        raise ConfigError(
            f"eval.report: {cfg.eval.report!r} is not valid; choose one of: "
            f"{', '.join(map(repr, ['', *REPORTS]))} ('' = no report)"
        )
    report = REPORTS[cfg.eval.report]
    if report.data_sources and cfg.data.source not in report.data_sources:
        raise ConfigError(
            f"eval.report={report.name!r} judges data.source "
            f"{' or '.join(report.data_sources)}, not {cfg.data.source!r}; set eval.report=''"
        )
    if report.text is not None and bool(cfg.model.text_encoder) != report.text:
        other = [r.name for r in REPORTS.values() if r.text in (None, not report.text)]
        raise ConfigError(
            f"eval.report={report.name!r} judges "
            f"{'text models (model.text_encoder set)' if report.text else 'models without text'}"
            f", but model.text_encoder={cfg.model.text_encoder!r}; set eval.report to one of: "
            f"{', '.join(map(repr, ['', *other]))}"
        )


def run_report(name: str, model: Any, path: Any, cfg: Config, **kwargs: Any) -> dict[str, Any]:
    return REPORTS[name].run(model, path, cfg, **kwargs)
