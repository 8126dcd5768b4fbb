# Ansible's default screen output, but a task that waits on `bpcp run` shows its progress.
# Set in ansible.cfg (stdout_callback = bpcp_progress); GPL-3.0-or-later like the callback it extends.
"""run.yml waits for `bpcp run` with a task retried until the run ends (`python -m
bpcp.jobs.progress follow`, which returns within a minute, or at once when a job is published).
Ansible's default callback prints each retry as "FAILED - RETRYING: ... (N retries left)", which
reads as a failure and says nothing of the run; this one prints the run's latest progress line
instead, once per new line. Every other event is the default callback's."""
from __future__ import annotations

from typing import Any

from ansible.plugins.callback.default import CallbackModule as DefaultCallback

DOCUMENTATION = """
    name: bpcp_progress
    type: stdout
    short_description: default output, with bpcp's progress lines while run.yml waits for the jobs
    description:
      - Ansible's default callback, except that retries of a task that prints lines starting
        with "bpcp:" (run.yml's wait for the jobs) show the newest such line instead of
        "FAILED - RETRYING".
    extends_documentation_fragment:
      - default_callback
      - result_format_callback
    requirements:
      - set as stdout_callback in ansible.cfg
"""


def _result(result: Any) -> dict:
    """The module's result (CallbackTaskResult.result since ansible-core 2.19, _result before)."""
    found = getattr(result, "result", None)
    return found if isinstance(found, dict) else getattr(result, "_result", {})


def _task(result: Any) -> Any:
    return getattr(result, "task", None) or result._task


def _bpcp_lines(result: Any) -> list[str]:
    lines = _result(result).get("stdout_lines") or []
    return [line for line in lines if isinstance(line, str) and line.startswith("bpcp: ")]


class CallbackModule(DefaultCallback):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "bpcp_progress"

    def __init__(self) -> None:
        super().__init__()
        self._bpcp_shown = ""

    def _show_progress(self, result: Any) -> bool:
        lines = _bpcp_lines(result)
        if not lines or not _task(result).until:
            return False
        task = _task(result)
        if self._last_task_banner != task._uuid:
            self._print_task_banner(task)
        if lines[-1] != self._bpcp_shown:
            self._bpcp_shown = lines[-1]
            self._display.display(lines[-1])
        return True

    def v2_playbook_on_no_hosts_matched(self) -> None:
        if self.get_option("display_skipped_hosts"):     # a play for hosts that are not there is skipped
            super().v2_playbook_on_no_hosts_matched()

    def v2_runner_retry(self, result: Any) -> None:
        if not self._show_progress(result):
            super().v2_runner_retry(result)

    def v2_runner_on_ok(self, result: Any) -> None:
        self._show_progress(result)
        super().v2_runner_on_ok(result)
