"""The click side of the two CLIs: what every client command shares.

`ClientGroup` is a CLI's root group. Every command under it (subgroups included) is a
`ClientCommand`, which takes `-o/--output` and `--query` and lists, after its help, the
environment variables it reads (and the settings file's section that can hold them).
The group turns every failure into `daemonkit.cliout`'s one error shape and exit code,
once, at the edge: the CLI's own errors (`translate`), settings-file errors, and click's
usage errors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any

import click

from .cliout import (
    EXIT_USAGE,
    FORMATS,
    CliError,
    apply_query,
    default_format,
    render,
    report_error,
    with_rfc3339,
)
from .config import ConfigError, Settings, config_path


def version() -> str:
    try:
        return metadata.version("encrypted-disks")
    except metadata.PackageNotFoundError:
        return "unknown"


def _remember(name: str):
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.meta[f"cliout.{name}"] = value
        return value
    return callback


class ClientCommand(click.Command):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(["-o", "--output"], type=click.Choice(FORMATS), expose_value=False,
                         is_eager=True, callback=_remember("output"),
                         help="json, table or tsv (default: table on a terminal, else json)"),
            click.Option(["--query"], expose_value=False, callback=_remember("query"),
                         metavar="JMESPATH", help="print only this part of the answer"),
        ]

    def invoke(self, ctx: click.Context) -> Any:
        root = ctx.find_root().command
        if isinstance(root, ClientGroup):
            root.before_command(ctx)
        return super().invoke(ctx)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        root = ctx.find_root().command
        if isinstance(root, ClientGroup):
            formatter.write_paragraph()
            formatter.write_text(f"Environment (or section [{root.settings.section}] of "
                                 f"{config_path()}):")
            formatter.write(root.settings.help_text() + "\n")


class ClientGroup(click.Group):
    """A CLI's root group (and, through `group_class`, its subgroups)."""

    command_class = ClientCommand
    group_class = type  # subgroups are of this class too, so their commands are ClientCommands

    settings: Settings
    time_keys: frozenset[str] = frozenset()
    translate: Callable[[Exception], CliError | None] = staticmethod(lambda e: None)

    def before_command(self, ctx: click.Context) -> None:
        """Called once a client command's options are parsed, before it runs."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CliError as e:
            fail(e)
        except ConfigError as e:
            fail(CliError(str(e), code="BadSettings", exit_code=EXIT_USAGE))
        except click.exceptions.Exit:
            raise
        except click.UsageError as e:
            # click's own usage text, then the one error shape (exit 2, as click's).
            if e.ctx is not None:
                click.echo(e.ctx.get_usage(), err=True)
            fail(CliError(e.format_message(), code="UsageError", exit_code=EXIT_USAGE))
        except click.ClickException as e:
            fail(CliError(e.format_message(), exit_code=e.exit_code))
        except Exception as e:
            err = ctx.find_root().command.translate(e)  # type: ignore[attr-defined]
            if err is None:
                raise
            fail(err)


def _meta(name: str) -> Any:
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(f"cliout.{name}") if ctx is not None else None


def output_format() -> str:
    return _meta("output") or default_format()


def fail(err: CliError) -> None:
    report_error(err, output_format())
    sys.exit(err.exit_code)


def emit(obj: Any) -> None:
    """Print a command's answer in the chosen format (nothing for None)."""
    if obj is None:
        return
    ctx = click.get_current_context()
    root = ctx.find_root().command
    keys = root.time_keys if isinstance(root, ClientGroup) else frozenset()
    text = render(apply_query(with_rfc3339(obj, keys), _meta("query")), output_format())
    if text:
        click.echo(text)
