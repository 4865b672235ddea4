import json
import logging
import subprocess
import sys


def test_json_logs_carry_subsys_and_stdlib_goes_through_structlog():
    code = (
        "from agent.log import get_logger; import logging;"
        "get_logger('datapath').info('attached', ifname='eth0');"
        "logging.getLogger('pyroute2').warning('from stdlib')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [json.loads(l) for l in out.stdout.splitlines()]
    assert lines[0]["subsys"] == "datapath" and lines[0]["event"] == "attached"
    assert lines[0]["ifname"] == "eth0" and lines[0]["level"] == "info"
    assert lines[1]["event"] == "from stdlib" and lines[1]["logger"] == "pyroute2"


def test_unknown_subsys_is_rejected():
    from agent.log import get_logger
    try:
        get_logger("bgp")
    except ValueError as e:
        assert "bgp-control-plane" in str(e)
    else:
        raise AssertionError("expected ValueError")
