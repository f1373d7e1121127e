"""`edgeserve gpu`: what this machine offers (GPUs matched to cards, or the CPU), and the card table."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from quantize.model.units import GIB
from server.hardware.cards import Card, all_cards
from server.hardware.detect import Detection, GpuInfo, detect, gpu_set_from_detection


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.1f}"


def _opt(value: object, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def _yes(flag: bool | None) -> str:
    """yes / no, and '?' where the card table has no source either way."""
    if flag is None:
        return "[yellow]?[/]"
    return "[green]yes[/]" if flag else "[red]no[/]"


def _toolkit(card: Card) -> str:
    toolkit = card.cuda_toolkit
    return "-" if toolkit is None else toolkit.label


def _pcie(g: GpuInfo) -> str:
    if g.pcie_gen_current is None and g.pcie_gen_max is None:
        return "-"
    return f"{_opt(g.pcie_gen_current)}/{_opt(g.pcie_gen_max)} x{_opt(g.pcie_width_current)}"


def _gpu_table(det: Detection) -> Table:
    table = Table(title="GPUs", title_justify="left")
    for col in (
        "#",
        "name",
        "card",
        "CC",
        "used/total GiB",
        "temp",
        "util",
        "power W",
        "PCIe gen x width",
        "procs",
    ):
        table.add_column(col, justify="right" if col in ("#", "temp", "util", "procs") else "left")
    for g in det.gpus:
        cc = f"{g.compute_capability[0]}.{g.compute_capability[1]}" if g.compute_capability else "-"
        power = f"{_opt(g.power_draw_w)}/{_opt(g.power_limit_w)} (max {_opt(g.power_max_limit_w)})"
        table.add_row(
            str(g.index),
            g.name,
            g.card_id or "[yellow]not in table[/]",
            cc,
            f"{_gib(g.memory_used_bytes)}/{_gib(g.memory_total_bytes)}",
            _opt(g.temperature_c, " C"),
            _opt(g.utilization_gpu_pct, "%"),
            power,
            _pcie(g),
            str(len(g.processes)),
        )
    return table


def _card_summary(det: Detection) -> str:
    card = det.card
    if card is None:
        return det.reason or ""
    gpu_set = gpu_set_from_detection(det)
    lines = [
        f"[bold]{det.count}x {card.name}[/] ({card.id}) - {card.architecture}, "
        f"CC {card.compute_capability[0]}.{card.compute_capability[1]}",
        f"driver {det.driver_version or '-'}, CUDA {det.cuda_version or '-'}",
        f"SGLang: {_yes(card.can_run_sglang)}   "
        f"llama.cpp flash attention: {_yes(card.has_flash_attn_kernels)}   "
        f"FP8 KV (SGLang): {_yes(card.can_fp8_kv)}   INT8 dp4a: {_yes(card.has_int8_dp4a)}",
    ]
    if card.cuda_toolkit is not None:
        # The toolkit llama.cpp must be built with; the driver's CUDA version above only bounds what runs.
        lines.append(f"CUDA toolkit for llama.cpp: {card.cuda_toolkit.label} - {card.cuda_toolkit.reason}")
    if gpu_set is not None:
        lines.append(
            f"usable for a plan: {_gib(gpu_set.memory_bytes_per_gpu)} GiB per GPU, "
            f"PCIe gen {_opt(gpu_set.link.pcie_gen)}, NVLink {_yes(gpu_set.link.has_nvlink)}"
        )
    if det.reason:
        lines.append(f"[yellow]{det.reason}[/]")
    return "\n".join(lines)


def _cpu_panel(det: Detection) -> Panel:
    cpu = det.cpu
    body = "\n".join(
        [
            f"[bold]No GPU[/]: {det.reason or 'none found'}",
            "Serving runs on the CPU through llama.cpp (embedded engine or llama-server).",
            f"CPU: {cpu.model_name}",
            f"cores: {_opt(cpu.physical_cores)} physical, {cpu.logical_cpus} logical, "
            f"{cpu.usable_cpus} usable",
            f"RAM: {_gib(cpu.total_ram_bytes)} GiB total, {_gib(cpu.available_ram_bytes)} GiB available",
        ]
    )
    return Panel(body, title="CPU only", title_align="left")


def _cards_table(cards: tuple[Card, ...]) -> Table:
    table = Table(title="Known cards", title_justify="left")
    cols = ("id", "name", "arch", "CC", "SMs", "memory", "GB/s", "TDP W", "SGLang", "FP8 KV", "CUDA")
    for col in (*cols, "NVLink"):
        table.add_column(col, no_wrap=col == "id")
    for c in cards:
        table.add_row(
            c.id,
            c.name,
            c.architecture,
            f"{c.compute_capability[0]}.{c.compute_capability[1]}",
            _opt(c.sm_count),
            f"{c.memory_gib:.0f} GiB {c.memory_type or ''}".strip(),
            _opt(c.bandwidth_gbps),
            _opt(c.tdp_w),
            _yes(c.can_run_sglang),
            _yes(c.can_fp8_kv),
            _toolkit(c),
            _yes(c.has_nvlink),
        )
    return table


def register(app: typer.Typer) -> None:
    """Add the `gpu` command to the CLI."""

    @app.command("gpu")
    def gpu(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
        cards: bool = typer.Option(False, "--cards", help="List the known cards instead of detecting."),
    ) -> None:
        """Show the GPUs of this machine matched to known cards (or the CPU when there is none)."""
        console = Console()
        if cards:
            rows = all_cards()
            if as_json:
                listing = [{**c.model_dump(mode="json"), "cuda_toolkit": _toolkit(c)} for c in rows]
                typer.echo(json.dumps({"cards": listing}, indent=2))
            else:
                console.print(_cards_table(rows))
            return
        det = detect()
        if as_json:
            typer.echo(json.dumps(det.model_dump(mode="json"), indent=2))
            return
        if det.is_cpu_only:
            console.print(_cpu_panel(det))
            return
        console.print(_card_summary(det))
        console.print(_gpu_table(det))
