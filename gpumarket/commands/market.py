"""`gpumarket offers`: the market, filtered as `GET /v1/offers` is."""

from decimal import Decimal

import typer
from pydantic import ValidationError
from rich.table import Table

from billing.amounts import show
from gpumarket.commands.common import (
    BAD_INPUT,
    JSON_OPTION,
    client,
    fail,
    handles_errors,
    out,
    print_json,
)
from provider_registry.schemas import OfferFilters

app = typer.Typer()
PANEL = "Market"


@app.command(rich_help_panel=PANEL)
@handles_errors
def offers(
    model: list[str] = typer.Option(
        [], "--model", "-m", help='GPU model, e.g. "H100" (repeat for any of several).'
    ),
    min_vram: float | None = typer.Option(None, help="At least this many GB of GPU memory."),
    min_compute_capability: str | None = typer.Option(None, help='e.g. "8.0".'),
    min_cuda: str | None = typer.Option(
        None, help='The driver supports at least this CUDA, e.g. "12.2".'
    ),
    max_price: Decimal | None = typer.Option(None, help="Credits per GPU-hour, at most."),
    region: list[str] = typer.Option([], help="In this region (repeat for any of several)."),
    min_reliability: float | None = typer.Option(None, help="0 to 1."),
    min_gpus: int = typer.Option(1, help="At least this many free GPUs on one machine."),
    label: list[str] = typer.Option([], help="key=value the machine must carry (repeat)."),
    sort: str = typer.Option(
        "price", help="price, reliability, vram or free_gpus; '-' first for descending."
    ),
    limit: int = typer.Option(20, help="At most this many."),
    as_json: bool = JSON_OPTION,
) -> None:
    """GPUs on offer now, cheapest first."""
    try:
        filters = OfferFilters.model_validate(
            {
                "model": model,
                "min_vram_gb": min_vram,
                "min_compute_capability": min_compute_capability,
                "min_cuda_version": min_cuda,
                "max_price": max_price,
                "region": region,
                "min_reliability": min_reliability,
                "min_gpus": min_gpus,
                "label": label,
                "sort": sort,
                "limit": limit,
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        option = str(first["loc"][0]) if first["loc"] else "options"
        raise fail(
            f"--{_OPTIONS.get(option, option).replace('_', '-')}: {first['msg']}", BAD_INPUT
        ) from None
    with client() as api:
        page = api.offers(filters)
    if as_json:
        print_json(page)
        return
    table = Table("MODEL", "VRAM", "FREE", "PRICE/H", "RELIABILITY", "CUDA", "REGION", "MACHINE")
    for offer in page.offers:
        name = offer.provider_name + (" (simulated)" if offer.simulated else "")
        table.add_row(
            offer.model,
            f"{offer.vram_gb:g} GB",
            f"{offer.free_gpus}/{offer.total_gpus}",
            show(offer.price_per_gpu_hour),
            f"{offer.reliability:.0%}",
            offer.cuda_version or "-",
            offer.region or "-",
            name,
        )
    out.print(table)
    if page.total > len(page.offers):
        out.print(f"{len(page.offers)} of {page.total} offers; --limit shows more", style="dim")


# Filter names whose option is spelt differently.
_OPTIONS = {"min_vram_gb": "min_vram", "min_cuda_version": "min_cuda"}
