"""``hetserve route``: the plan's router in front of OpenAI-compatible servers (docs/deploy.md)."""

from __future__ import annotations

import argparse
import sys

from ...errors import HetserveError


def add_route_parser(sub) -> argparse.ArgumentParser:
    from ..api.cli import add_http_options
    from .app import RouterSettings

    d = RouterSettings()
    r = sub.add_parser(
        "route",
        help="the plan's router as an OpenAI-compatible proxy in front of vLLM, SGLang or hetserve servers",
    )
    r.add_argument("--plan", required=True, help="plan YAML whose instances the backends stand for")
    r.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="an instance of the plan and the base URL of the server running it (once per instance)",
    )
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    r.add_argument("--port", type=int, default=8080)
    r.add_argument(
        "--retries", type=int, default=d.retries, help=f"other backends tried (default {d.retries})"
    )
    for flag, what in (
        ("health_interval", "seconds between health checks of each backend"),
        ("request_timeout", "seconds without a byte from a backend before it counts as failed"),
        ("queue_timeout", "seconds a request may wait for a free slot under jffc"),
    ):
        value = getattr(d, flag)
        r.add_argument(
            "--" + flag.replace("_", "-"),
            type=float,
            default=value,
            metavar="S",
            help=f"{what} (default {value:g})",
        )
    r.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_http_options(r)
    r.set_defaults(func=cmd_route)
    return r


def cmd_route(args) -> int:
    from ...plan import PlanFile
    from ...specs.loading import load_yaml_model
    from ..api.cli import access_note, flag_error, http_settings
    from ..api.server import serve
    from .app import RouterSettings, create_router_app
    from .backends import backends_for, parse_backend_flags

    plan = load_yaml_model(PlanFile, args.plan, "plan file")
    if not args.backend:
        names = ", ".join(f"{i.name}=URL" for i in plan.instances)
        raise HetserveError(f"--backend: give one per instance of {args.plan}: {names}")
    backends = backends_for(plan, parse_backend_flags(args.backend), args.plan)
    try:
        settings = RouterSettings(
            retries=args.retries,
            health_interval=args.health_interval,
            request_timeout=args.request_timeout,
            queue_timeout=args.queue_timeout,
        )
    except ValueError as exc:
        raise flag_error(exc) from None
    limits, access = http_settings(args)
    app = create_router_app(plan, backends, settings, limits, access)
    print(
        f"routing {plan.name} on http://{args.host}:{args.port}: policy {plan.routing.policy}"
        + (f", hand-off {plan.routing.handoff}" if any(b.role == "prefill" for b in backends) else ""),
        file=sys.stderr,
    )
    for b in backends:
        print(f"  {b.name} ({b.role}, weight {b.weight:g}): {b.url}", file=sys.stderr)
    note = access_note(args, access)
    if note:
        print(note, file=sys.stderr)
    serve(app, args.host, args.port, args.log_level)
    return 0
