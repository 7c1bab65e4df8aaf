"""Uncertainty commands: ``uncertainty`` (Prob-UNet maps) and ``inter-rater`` (rater
agreement, and how well the maps predict disagreement), on the pipeline's benchmark stack
(no arguments: the DVC stages) or on a user's own stack and rater masks;
``compare-prob-models`` (flat vs hierarchical Prob-UNet on the benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from microseg.cli._options import ParamsOpt, SetOpt, load

PunetModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="a Prob-UNet: punet, a model file or folder, or a models:/ URI of a Prob-UNet or "
        "spine pipeline (default: models/punet/best.pt)",
    ),
]
PunetWeightsOpt = Annotated[Path | None, typer.Option("--weights", help="Prob-UNet model file")]
SamplesOpt = Annotated[
    int | None, typer.Option("--samples", help="prior samples (default: punet.predict)")
]
TemperatureOpt = Annotated[
    float | None,
    typer.Option("--temperature", help="logits divided by T (default: punet.predict)"),
]


def uncertainty(
    stack: Annotated[
        Path | None,
        typer.Argument(help="a ZYX stack of your own (default: the pipeline's benchmark)"),
    ] = None,
    samples: SamplesOpt = None,
    temperature: TemperatureOpt = None,
    planes: Annotated[
        str | None, typer.Option("--planes", help="planes a:b of STACK (b excluded)")
    ] = None,
    model: PunetModelOpt = None,
    weights: PunetWeightsOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="default: reports/uncertainty/<stack name>"),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Prob-UNet uncertainty maps (mean, variance, entropy, MI, aleatoric) and panels."""
    from microseg.stages import evaluation

    params = load(params_path, set_)
    if stack is None:
        _benchmark_only("uncertainty", samples=samples, temperature=temperature, planes=planes,
                        model=model, weights=weights, out=out)  # fmt: skip
        result = evaluation.run_uncertainty(params)
        typer.echo(f"uncertainty maps and panels in {result.out}")
        return
    from microseg.stages.uncertainty_tools import uncertainty_on_stack

    result = uncertainty_on_stack(
        params, stack, samples=samples, temperature=temperature, planes=planes, model=model,
        weights=weights, out=out,
    )  # fmt: skip
    for head, means in result.metrics.items():
        typer.echo(
            f"{head}: mean entropy {means['mean_entropy']:.4f}, mean MI "
            f"{means['mean_mutual_information']:.4f}"
        )
    typer.echo(f"uncertainty maps and panels in {result.out}")


def _benchmark_only(command: str, **given: object) -> None:
    """Options that only make sense with a user's stack are refused without one."""
    named = [f"--{k}" for k, v in given.items() if v not in (None, [])]
    if named:
        from microseg.errors import ConfigError

        raise ConfigError(
            f"{command}: {', '.join(named)}: only with a stack of your own (STACK/--stack)"
        )


def inter_rater(
    stack: Annotated[
        Path | None,
        typer.Option("--stack", help="a ZYX stack of your own (default: the benchmark)"),
    ] = None,
    rater: Annotated[
        list[Path] | None,
        typer.Option("--rater", help="a rater's binary spine mask, shaped as --stack (2+)"),
    ] = None,
    model: PunetModelOpt = None,
    weights: PunetWeightsOpt = None,
    samples: SamplesOpt = None,
    temperature: TemperatureOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="default: reports/inter_rater/<stack name>"),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Rater disagreement maps and how well model uncertainty predicts them."""
    from microseg.stages import evaluation

    params = load(params_path, set_)
    if stack is None:
        _benchmark_only("inter-rater", rater=rater, model=model, weights=weights,
                        samples=samples, temperature=temperature, out=out)  # fmt: skip
        result = evaluation.run_inter_rater(params)
        for head, r in result.metrics.items():
            auroc = r.get("entropy_auroc", float("nan"))
            typer.echo(f"{head}: AUROC of predictive entropy for rater disagreement {auroc:.3f}")
        return
    from microseg.stages.uncertainty_tools import inter_rater_on_stack

    result = inter_rater_on_stack(
        params, stack, rater or [], model=model, weights=weights, samples=samples,
        temperature=temperature, out=out,
    )  # fmt: skip
    m = result.metrics
    typer.echo(
        f"{m['n_raters']} raters: Fleiss' kappa {m['fleiss_kappa']:.3f}, mean pairwise Dice "
        f"{m['mean_pairwise_dice']:.3f}"
    )
    if "auroc" in m:
        typer.echo(
            f"AUROC of predictive entropy for rater disagreement {m['auroc']['entropy']:.3f}"
        )
    typer.echo(f"disagreement, consensus and inter_rater.json in {result.out}")


def compare_prob_models(
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Flat vs hierarchical Prob-UNet on the benchmark: Dice, ECE, AUROC for rater
    disagreement (metrics/prob_models.json)."""
    from microseg.stages.prob_models import run_compare_prob_models

    result = run_compare_prob_models(load(params_path, set_))
    for name, row in result.metrics.items():
        typer.echo(
            f"{name}: spine Dice {row['spine_dice']:.3f}, ECE {row['spine_ece']:.4f}, "
            f"AUROC(entropy) {row.get('entropy_auroc', float('nan')):.3f}"
        )
