"""`clawrouter generate` and `clawrouter edit`: make an image from the terminal.

Both talk to the running gateway or start one in-process (`client.py`), show a spinner with the
elapsed time on stderr while waiting (slow models take minutes), then print where the images
were saved, their local URLs and what they cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from clawrouter import catalog
from clawrouter.cli.client import (
    MAYBE_PAID, STOP_WAIT, URL_HELP, BadGatewayUrl, Gateway, GatewayError, ImageResult, connect,
    file_like_dir, output_dir, source_arg, to_stderr,
)
from clawrouter.cli.common import add_config, at_least, fail, file_problem, setup_problem
from clawrouter.validate import MAX_N

_ENV = ("Uses the running gateway (--url or CLAWROUTER_URL: that one only, and if it does not "
        "answer the command fails; else where `clawrouter serve` listens with your settings, "
        "http://127.0.0.1:8402 by default; CLAWROUTER_API_KEY is sent as a bearer token when "
        "set) or, when none answers there, runs one inside this command with your settings "
        "(if another command is running its own, after it finishes). Each run is a new "
        "request: run twice, one after the other, it makes (and pays for) two images (two "
        "identical runs at once on one gateway share one). Exit codes: 0 saved, 1 the "
        "request failed or no gateway answers at the URL named (the message is printed), 2 "
        "usage or configuration error, 130 interrupted (Ctrl-C or SIGTERM; a payment may be "
        "under way if the request was sent; once the images are saved and shown, an "
        "interrupt only cuts short the stop of this command's own gateway, and exits 0).")


def register(commands: Any) -> None:
    g = commands.add_parser(
        "generate", help="generate images from a prompt and save them",
        description="Generate images from a text prompt, pay for them from the local wallet "
        "and save them. " + _ENV)
    g.add_argument("prompt", type=prompt_text, help="what to draw")
    _common(g, catalog.DEFAULT_GENERATE_MODEL)
    g.add_argument("-n", type=at_least(1, MAX_N), default=None, metavar="N",
                   help=f"how many images, 1 to {MAX_N} (default 1; each is paid)")
    g.set_defaults(run=run_generate)

    e = commands.add_parser(
        "edit", help="edit images with a prompt and save the results",
        description="Edit one or more images with a text prompt and save the results. " + _ENV)
    e.add_argument("images", nargs="+", metavar="IMAGE",
                   help="source image: a local path (made absolute), an http(s) URL or a "
                   "data: URI; several for models that combine images")
    e.add_argument("prompt", type=prompt_text, help="the change to make")
    e.add_argument("--mask", metavar="IMAGE",
                   help="PNG mask (path, URL or data URI): transparent pixels mark the area "
                   "to edit; one source image, and only with "
                   + ", ".join(m.id for m in catalog.MODELS if m.mask))
    _common(e, catalog.DEFAULT_EDIT_MODEL)
    e.set_defaults(run=run_edit)


def _common(p: argparse.ArgumentParser, default_model: str) -> None:
    p.add_argument("--model", help=f"model id or alias (default {default_model}; see "
                   "`clawrouter models`)")
    p.add_argument("--size", metavar="WxH",
                   help=f"image size, e.g. 1536x1024 (default {catalog.DEFAULT_SIZE})")
    p.add_argument("--out", metavar="DIR", type=out_dir, help="directory to save into "
                   "(default $CLAWROUTER_OUT or ~/Pictures/clawrouter; created if needed; "
                   "files are named by the images, so a new DIR named like x.png is refused)")
    p.add_argument("--open", action="store_true",
                   help="open the saved images with the system viewer")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (model, cost_usd, transaction, images with "
                   "url and path) on stdout and nothing else")
    p.add_argument("--url", help=URL_HELP)
    add_config(p)


def prompt_text(value: str) -> str:
    """An argparse `type`: a prompt with words in it. The gateway refuses a blank one too,
    but only once this command has found or started a gateway (and made a wallet)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("the prompt is empty: say what to draw or change")
    return value


def out_dir(value: str) -> str:
    """An argparse `type`: `--out` as a directory, refused at once if it looks like a file's
    name (see `file_like_dir`)."""
    from pathlib import Path

    problem = file_like_dir(Path(value).expanduser())
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def run_generate(args: argparse.Namespace) -> int:
    model = args.model or catalog.DEFAULT_GENERATE_MODEL
    return _run(args, f"generating with {model}",
                lambda gw: gw.generate(args.prompt, model=args.model, size=args.size, n=args.n,
                                       out=args.out))


def run_edit(args: argparse.Namespace) -> int:
    model = args.model or catalog.DEFAULT_EDIT_MODEL
    images = [source_arg(i) for i in args.images]
    mask = source_arg(args.mask) if args.mask else None
    return _run(args, f"editing with {model}",
                lambda gw: gw.edit(args.prompt, images, mask=mask, model=args.model,
                                   size=args.size, out=args.out))


def _run(args: argparse.Namespace, doing: str,
         call: Callable[[Gateway], Awaitable[ImageResult]]) -> int:
    request = _Request(show=lambda result: _show(args, result))
    try:
        with _terminate_as_interrupt():
            result = asyncio.run(_request(args.url, args.out, doing, call, request))
    except KeyboardInterrupt:
        if request.shown:  # while this command's gateway stopped: the paid result is out
            to_stderr("interrupted after the images were saved and shown: nothing is lost")
            return 0
        message = request.interrupted()  # (said already if it came during the request)
        return fail(args, message, 130, "interrupted", line=False)
    except BadGatewayUrl as exc:
        return fail(args, str(exc), 2, "bad_gateway_url")
    except (ValueError, FileNotFoundError) as exc:
        return fail(args, f"invalid configuration: {exc}", 2, "invalid_configuration")
    except GatewayError as exc:
        # the gateway this command starts could not: the set-up's fault, as for `serve`
        if (setup := setup_problem(exc.__cause__)) is not None:
            return fail(args, setup, 2, exc.code, exc.to_json() | {"message": setup})
        usage = exc.code == "bad_output_dir"  # CLAWROUTER_OUT's, as --out's: nothing was sent
        return fail(args, exc.message, 2 if usage else 1, exc.code, exc.to_json())
    except OSError as exc:  # the settings file, before anything was sent (saving: `_save`)
        if (problem := file_problem(exc)) is None:
            raise
        return fail(args, problem, 2, "file_problem")
    if args.open:  # (not under `_signals_held`: the viewer would inherit the held signals)
        for image in result.images:
            open_file(image.path)
    return 0


def _show(args: argparse.Namespace, result: ImageResult) -> None:
    """Print where the images were saved (or the `--json` document)."""
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        for image in result.images:
            print(image.path)
            if image.url:  # (none for an image the gateway could not store)
                print(f"  {image.url}")
        cost = f"${result.cost_usd}" if result.cost_usd is not None else "unknown"
        if result.sandbox:
            cost += " in the sandbox (no real payment; placeholder images)"
        if result.shared:
            cost += (", paid by an identical request that had not received them (one still "
                     "running, or a run stopped before its answer): the same images, nothing "
                     "paid again (run it again for new ones)")
        print(f"{len(result.images)} image(s) · {result.model} · cost {cost}")
        if result.in_process:
            print("(the URLs worked while this command ran its own gateway; "
                  "`clawrouter serve` keeps them up)")
    sys.stdout.flush()  # before this command's gateway stops, which an interrupt may cut short


@dataclass
class _Request:
    """How far a command's request got, for what an interruption says."""

    gateway: Gateway | None = None
    #: the line said about the interruption, once said
    told: str | None = None
    #: how the result is shown (`_show`): as soon as it is saved, before the gateway stops
    show: Callable[[ImageResult], None] = lambda result: None
    #: the result was shown: an interrupt after it cuts short only the gateway's stop
    shown: bool = False

    def interrupted(self) -> str:
        """Say (once) that the command was interrupted, and whether a payment may be under
        way: as soon as it happens, not after this command's own gateway has stopped."""
        if self.told is None:
            self.told = (f"interrupted. {MAYBE_PAID}" if self.gateway and self.gateway.posted
                         else "interrupted before the request was sent: nothing was paid.")
            to_stderr(self.told)
        return self.told


async def _request(url: str | None, out: str | None, doing: str,
                   call: Callable[[Gateway], Awaitable[ImageResult]],
                   request: _Request) -> ImageResult:
    """Make the request and show its result, then let the gateway go: a gateway this command
    started stops only then, and may take seconds to, while the images are saved and paid
    for already. Shown first, an interrupt during that stop hides nothing."""
    spinner = Spinner(doing)
    spinner.start()
    try:
        await asyncio.to_thread(output_dir, out)  # before a gateway is started for nothing
        gateway = request.gateway = await connect(url, waiting=spinner.note)
        gateway.new_calls = True  # (the user typed this command: see `client.NEW_CALL`)
        try:
            if gateway.in_process:
                spinner.note("no gateway running; started one in this process")
            result = await call(gateway)
        except asyncio.CancelledError:  # Ctrl-C (asyncio.run cancels us) or SIGTERM
            await _interrupted(spinner, request, gateway)
            raise
        else:
            await spinner.stop()  # (awaits nothing: no interrupt lands before the result)
            with _signals_held():  # shown whole, once: then an interrupt cuts only the stop
                request.show(result)
                request.shown = True
        finally:
            await gateway.aclose()
    finally:
        await spinner.stop()
    return result


async def _interrupted(spinner: Spinner, request: _Request, gateway: Gateway) -> None:
    """Stop the spinner and say so at once: a gateway this command runs stops only once the
    paid request under way there has ended, which a slow model can take seconds to do."""
    await spinner.stop()
    request.interrupted()
    if gateway.in_process and gateway.posted:
        to_stderr("waiting for the gateway this command started to finish that request and "
                  f"stop (at most {STOP_WAIT:g} s)")


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then reach their own handlers: SIGTERM
    raises KeyboardInterrupt wherever it lands, and half a JSON document followed by an error
    one would send a script to ask, and pay, again for images it has. (Handlers, not a signal
    mask: a mask holds a signal back from this thread only, not from the process's others.)"""
    caught: list[int] = []
    try:
        with _handlers(dict.fromkeys((signal.SIGINT, signal.SIGTERM),
                                     lambda signum, frame: caught.append(signum))):
            yield
    finally:
        for signum in caught:
            signal.raise_signal(signum)


def _terminate_as_interrupt() -> AbstractContextManager[None]:
    """SIGTERM (an agent's shell timeout) ends the command like Ctrl-C: with a word about
    the payment that may be under way, instead of silently."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    return _handlers({signal.SIGTERM: interrupt})


@contextmanager
def _handlers(handlers: dict[int, Callable[[int, Any], None]]) -> Iterator[None]:
    """`handlers` for the block's signals, then the ones before. Not in a thread other than
    the main one (a caller embedding us), where signals are left alone."""
    try:
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Spinner:
    """`⠋ generating with X… 12s` on stderr, redrawn in place; silent unless stderr is a TTY."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self._task: asyncio.Task[None] | None = None
        self._start = time.monotonic()

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._spin())

    def note(self, text: str) -> None:
        """A line that stays (printed above the spinner when there is one)."""
        sys.stderr.write(f"\r\033[K{text}\n" if self.enabled else f"clawrouter: {text}\n")
        sys.stderr.flush()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    async def _spin(self) -> None:
        frame = 0
        while True:
            elapsed = int(time.monotonic() - self._start)
            sys.stderr.write(f"\r{self.FRAMES[frame % len(self.FRAMES)]} {self.label}… "
                             f"{elapsed // 60}:{elapsed % 60:02d}")
            sys.stderr.flush()
            frame += 1
            await asyncio.sleep(0.1)


def viewer_environment() -> dict[str, str]:
    """This process's environment without our settings: a viewer (and whatever the desktop
    starts through it) has no use for BLOCKRUN_WALLET_KEY or CLAWROUTER_API_KEY."""
    return {name: value for name, value in os.environ.items()
            if not name.upper().startswith(("CLAWROUTER_", "BLOCKRUN_"))}


def open_file(path: str) -> None:
    """Hand a file to the desktop's viewer without waiting for it."""
    if sys.platform == "darwin":
        command = ["open", path]
    elif os.name == "nt":
        os.startfile(path)  # type: ignore[attr-defined]
        return
    else:
        command = ["xdg-open", path]
    try:
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, env=viewer_environment())
    except OSError as exc:
        print(f"clawrouter: could not open {path}: {exc}", file=sys.stderr)
