"""Locust load shapes: `step` adds users in steps up to -u and holds there until -t is over.

The constant shape is Locust's own (-u users for -t seconds), so only the step shape is a class; the
locustfile exposes it to Locust when the workload asks for it (Locust runs the shape class it finds in
the locustfile).
"""

from __future__ import annotations

from typing import ClassVar

from locust import LoadTestShape

from loadtest.workload import Workload


class StepLoad(LoadTestShape):
    """`step_users` more users every `step_s` seconds up to -u (--users), until -t (--run-time) is over.

    The shape ends the run itself: headless Locust waits for a shape to finish before it would arm -t.
    """

    use_common_options: ClassVar[bool] = True
    workload: ClassVar[Workload] = Workload()

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner is not None else None
        top = max(1, int(getattr(options, "num_users", 1) or 1))
        run_time = getattr(options, "run_time", None)
        elapsed = self.get_run_time()
        if run_time and elapsed >= run_time:
            return None
        step = int(elapsed // self.workload.step_s) + 1
        users = min(top, step * self.workload.step_users)
        return users, float(users)
