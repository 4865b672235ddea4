"""Router flaps through the real daemon, against FRR, GoBGP and BIRD: reconnect within
connectRetryTimeSeconds + 2 s after 30 s and 300 s outages, `vipctl bgp reset` hard and soft,
ClusterConfig ownership kept against an earlier name (router_restart_scenario.py says how).

The scenario starts in the background when the session starts (conftest.py in this
directory), so its 330 s of routers being down overlap the rest of the suite; this test waits
for it and fails with its output if it failed.
"""

import pytest

SCENARIO_TIMEOUT = 900


@pytest.mark.e2e
def test_router_restarts_reconnect_within_connect_retry_and_operator_resets(router_restart_scenario):
    proc, output = router_restart_scenario
    try:
        proc.wait(timeout=SCENARIO_TIMEOUT)
    finally:
        text = output.read_text(errors="replace") if output.exists() else ""
    assert proc.returncode == 0, f"scenario failed ({proc.returncode}):\n{text[-6000:]}"
    assert "router restart scenario: OK" in text
    print(text[-2000:])
