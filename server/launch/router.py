"""SGLang's model gateway (`sglang-router`) in front of several edgeserve boxes: its command.

Each setting of the command comes with why it has its value.

Every box runs an edgeserve gateway (the embedded engine, or a gateway over llama-server / SGLang), which is
an SGLang-shaped HTTP worker for the router (server/gateway/routes/worker.py). The router's defaults are made
for racks of big GPUs (a worker marked down after 3 x 60 s of failed health checks, a breaker closed for 60 s,
rebalancing only past 64 requests of difference); the settings here are picked for two or three small
boxes, each with a reason, the way the launcher explains a plan. A setting the cluster file gives is kept.

The keys are the router's own option names (`--policy` is `policy`, `--cb-timeout-duration-secs` is
`cb_timeout_duration_secs`), so the cluster file, the reasons and the command line name a setting alike.
Checked against sglang-router 0.3.2's parser (`sglang_router.launch_router.parse_router_args`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.launch.plan import LaunchPlan, Reason, Scalar

RouterPolicy = Literal["cache_aware", "round_robin", "power_of_two", "random"]
ROUTER_MODULE = "sglang_router.launch_router"
DEFAULT_PORT = 30000
DEFAULT_METRICS_PORT = 29000
# sglang-router 0.3.2 reads /get_load for power_of_two every 30 s, and that interval is no option of it.
LOAD_POLL_S = 30


class RouterSettings(BaseModel):
    """`router:` in the cluster file. None = edgeserve picks the value for small boxes (see `router_plan`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(default="127.0.0.1", description="address the router listens on for clients")
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    prometheus_port: int = Field(default=DEFAULT_METRICS_PORT, ge=1, le=65535)
    policy: RouterPolicy | None = None
    balance_abs_threshold: int | None = Field(default=None, ge=0)
    health_check_endpoint: str | None = None
    health_check_interval_secs: int | None = Field(default=None, ge=1)
    health_failure_threshold: int | None = Field(default=None, ge=1)
    health_success_threshold: int | None = Field(default=None, ge=1)
    retry_max_retries: int | None = Field(default=None, ge=1)
    retry_initial_backoff_ms: int | None = Field(default=None, ge=1)
    retry_max_backoff_ms: int | None = Field(default=None, ge=1)
    cb_failure_threshold: int | None = Field(default=None, ge=1)
    cb_success_threshold: int | None = Field(default=None, ge=1)
    cb_timeout_duration_secs: int | None = Field(default=None, ge=1)


class RouterPlan(BaseModel):
    """The router's command and the reason for every setting it passes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    port: int
    prometheus_port: int
    worker_urls: tuple[str, ...]
    argv: tuple[str, ...]
    reasons: tuple[Reason, ...]

    @property
    def url(self) -> str:
        return f"http://{_reachable(self.host)}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_reachable(self.host)}:{self.prometheus_port}/metrics"


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _small_box_defaults(boxes: tuple[LaunchPlan, ...]) -> dict[str, tuple[Scalar, str]]:
    """The value edgeserve picks for each setting, and why, given the boxes' plans."""
    slots = min(p.n_parallel for p in boxes)
    caching = all(p.prefix_cache for p in boxes)
    policy_why = (
        "every box keeps finished prompts' KV in its slots (prefix_cache): a prompt sent back to the box "
        "holding its prefix skips that prefill, most of a small box's time to first token; cache_aware "
        "falls back to the box with the fewest requests in flight (the router's own live count) when boxes "
        f"drift apart, while power_of_two reads each box's /get_load only every {LOAD_POLL_S} s"
        if caching else
        "a box without prefix_cache gains nothing from prefix affinity: plain rotation over the boxes"
    )
    return {
        "policy": ("cache_aware" if caching else "round_robin", policy_why),
        "balance_abs_threshold": (
            slots,
            f"a box with a full batch ({slots} = the smallest box's n_parallel) more requests in flight than "
            "another gets no new ones, whatever it has cached (the router's default, 64, suits big GPUs)",
        ),
        "health_check_endpoint": (
            "/ready",
            "edgeserve's /health is liveness (200 while the model loads); /ready is 503 while it loads, when "
            "its backend is down, or when its slots and queue are full",
        ),
        "health_check_interval_secs": (2, "a dead box is out of rotation within seconds (default: 60 s)"),
        "health_failure_threshold": (2, "two missed checks in a row: about 4 s to take a dead box out"),
        "health_success_threshold": (1, "a box that answers /ready has its model loaded: back at once"),
        "retry_max_retries": (
            min(5, len(boxes) + 1),
            f"one try per box and one more ({len(boxes)} boxes): further tries only revisit boxes that "
            "just failed",
        ),
        "retry_initial_backoff_ms": (100, "a refused connection (a box gone) is known at once: retry soon"),
        "retry_max_backoff_ms": (
            2000,
            "a full box answers 429 with Retry-After 1 s: waiting up to 2 s covers it without holding a "
            "client for the default 30 s",
        ),
        "cb_failure_threshold": (
            3,
            "a killed box fails every request at once: 3 in a row open its breaker (default: 10, each "
            "one a retry)",
        ),
        "cb_success_threshold": (1, "one good answer in half-open closes the breaker again"),
        "cb_timeout_duration_secs": (
            10,
            "a crashed backend is restarted by its box's supervisor within seconds: try the box again after "
            "10 s, not the default 60 s",
        ),
    }


def router_plan(settings: RouterSettings, boxes: tuple[LaunchPlan, ...], worker_urls: tuple[str, ...],
                python: str) -> RouterPlan:
    """`python -m sglang_router.launch_router ...` over `worker_urls` (pure)."""
    if not worker_urls:
        raise ValueError("a router needs at least one worker URL")
    reasons = [
        Reason(setting="worker_urls", value=" ".join(worker_urls), source="derived",
               why="every box's edgeserve gateway, in the cluster file's order"),
        Reason(setting="backend", value="sglang", source="default",
               why="the router's HTTP mode: its policies, retries, breakers and health checks apply (its "
               "openai mode is a proxy to one endpoint, without load balancing)"),
    ]
    args = [python, "-m", ROUTER_MODULE, "--worker-urls", *worker_urls,
            "--host", settings.host, "--port", str(settings.port),
            "--prometheus-host", settings.host, "--prometheus-port", str(settings.prometheus_port)]
    for name, (default, why) in _small_box_defaults(boxes).items():
        given = getattr(settings, name)
        value = default if given is None else given
        if given is None:
            reasons.append(Reason(setting=name, value=value, source="derived", why=why))
        else:
            reasons.append(Reason(setting=name, value=value, source="profile",
                                  why=f"router.{name} in the cluster file"))
        args += ["--" + name.replace("_", "-"), str(value)]
    return RouterPlan(host=settings.host, port=settings.port, prometheus_port=settings.prometheus_port,
                      worker_urls=worker_urls, argv=tuple(args), reasons=tuple(reasons))
