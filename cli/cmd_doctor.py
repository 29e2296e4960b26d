"""`spofa doctor`: print what is installed and usable here (versions) and what each missing piece disables."""
from __future__ import annotations

import json
from typing import Annotated

import typer


def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print the checks as JSON instead of a table.")] = False,
) -> None:
    """Show which components (torch, CUDA, ONNX Runtime providers, TensorRT, ModelOpt, ...) are usable here."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from spofa_deploy.doctor import CPU_COMPONENT, diagnose

    checks = diagnose()
    if json_out:
        typer.echo(json.dumps([c.to_dict() for c in checks], indent=2))
        return
    cpu = [c for c in checks if c.component == CPU_COMPONENT]  # printed on its own line, below the table
    checks = [c for c in checks if c.component != CPU_COMPONENT]
    t = Table(title="spofa doctor")
    t.add_column("component")
    t.add_column("installed")
    t.add_column("version")
    t.add_column("usable")
    t.add_column("details")
    for c in checks:
        usable = "[green]yes[/]" if c.usable else ("[red]NO[/]" if c.required else "[yellow]no[/]")
        t.add_row(escape(c.component), "yes" if c.installed else "no", escape(c.version or "-"), usable, escape(c.detail))
    console = Console()
    console.print(t)
    for c in cpu:
        console.print(f"{'' if c.usable else '[yellow]warning:[/] '}CPU: {escape(c.detail)}")
    lost = [c for c in checks if not c.usable and c.disables]
    if lost:
        console.print("[bold]not usable here, and what that disables:[/]")
        for c in lost:
            console.print(f"  {escape(c.component)}: {escape(c.disables)}")
    broken = [c.component for c in checks if c.required and not c.usable]
    if broken:
        console.print(f"[red]spofa-deploy cannot run here: {', '.join(broken)} not usable[/]")
    else:
        console.print(f"{sum(c.usable for c in checks)} of {len(checks)} usable"
                      + ("; everything else only disables the features listed" if lost else ""))
