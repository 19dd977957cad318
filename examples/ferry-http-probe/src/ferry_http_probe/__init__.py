"""Example Ferry plugins (docs/plugins.md in the Ferry repository).

- `http_probe` (signal source): GETs a URL every `interval` and publishes
  ``http_probe.<name>.up`` (1/0), ``.status`` and ``.latency_seconds``.
- `evacuate_then_run` (action): evacuates the policy's containers through the
  agent, then runs a command or POSTs a webhook with the outcome.
"""

from ferry_http_probe.hook import EvacuateThenRun, HookParams
from ferry_http_probe.probe import HttpProbeSource, ProbeParams

__all__ = ["EvacuateThenRun", "HookParams", "HttpProbeSource", "ProbeParams"]
