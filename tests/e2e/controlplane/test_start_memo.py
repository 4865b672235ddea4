"""The start-up plan memo through the real daemon (`vipd run --lb-interface`, ScaleLab, a real
FRR peer with zebra): a warm restart with unchanged inputs loads the previous agent's plan
(LB-IPAM, frontends, VIP paths; agent/controlplane/startmemo.py); a configuration changed
while the agent was stopped, or a damaged memo file, is computed anew — the router gets the
new VIP and each VIP is answered by the pod its EndpointSlice names now, not the old one.
"""

from __future__ import annotations

import json

from agent.lab import Lab, wait_until
from agent.lab.scale import NODE_IP, NODE_NAME, POOL, ScaleLab, service_docs, vip_of
from agent.controlplane.startmemo import FILE

N = 200


def _memo_lines(env) -> list[dict]:
    return [json.loads(line) for line in env.log().splitlines()
            if line.startswith("{") and '"start-up plan memo' in line]


def _restart(env, expect: int) -> dict:
    """Stop the agent (SIGTERM), start it again on the same state dir and pins, wait until FRR
    has ``expect`` prefixes; -> the new agent's memo line."""
    env.proc.terminate()
    env.proc.wait(timeout=60)
    assert _memo_lines(env)[-1]["event"] == "start-up plan memo written", env.log()[-2000:]
    before = len(_memo_lines(env))
    env.start()
    wait_until(lambda: env.proc.poll() is not None or (
        '"vipd running"' in env.log().rsplit('"vipd stopped"', 1)[-1] and env.accepted() >= expect),
        timeout=90, interval=0.3, what=f"the restarted agent running, {expect} VIPs at FRR")
    assert env.proc.poll() is None, env.log()[-3000:]
    (line,) = [m for m in _memo_lines(env)[before:] if m["event"] == "start-up plan memo"]
    return line


def test_warm_restart_uses_the_memo_only_for_unchanged_inputs():
    changed, new = 7, N
    with Lab("xmemo") as lab:
        env = ScaleLab(lab)
        try:
            env.write_services(N, ports=1)
            env.router.route(POOL, via=NODE_IP)   # TCP to a VIP reaches the node without BGP
            env.start()
            wait_until(lambda: env.accepted() >= N or env.proc.poll() is not None, timeout=90,
                       interval=0.3, what=f"{N} VIPs at FRR")
            assert env.proc.poll() is None, env.log()[-3000:]
            assert env.connect(vip_of(changed), 80, 1) == [f"p{changed % 4}"]

            # unchanged inputs: the plan comes from the memo, and the node serves as before
            assert _restart(env, N)["used"] is True
            assert env.accepted() == N
            assert env.connect(vip_of(changed), 80, 1) == [f"p{changed % 4}"]

            # changed while stopped: Service 7's endpoint moves to pod 0, one Service is added
            services = env.config_dir / "services-000.yaml"
            text = services.read_text()
            one = service_docs(changed, ports=1, pods=env.pod_ips, node_name=NODE_NAME)
            assert one in text
            services.write_text(text.replace(one, service_docs(changed, ports=1, pods=env.pod_ips[:1],
                                                               node_name=NODE_NAME)))
            env.write("extra.yaml", service_docs(new, ports=1, pods=env.pod_ips, node_name=NODE_NAME))
            line = _restart(env, N + 1)
            assert line["used"] is False and line["reason"] == "no memo for these inputs", line
            assert env.accepted() == N + 1
            assert env.connect(vip_of(changed), 80, 2) == ["p0", "p0"]
            assert env.connect(vip_of(new), 80, 1) == [f"p{new % 4}"]

            # the memo of the changed configuration: used by the next restart, same answers
            assert _restart(env, N + 1)["used"] is True
            assert env.connect(vip_of(changed), 80, 2) == ["p0", "p0"]
            assert env.connect(vip_of(new), 80, 1) == [f"p{new % 4}"]

            # a damaged memo file (cut short) is not trusted
            env.proc.terminate()
            env.proc.wait(timeout=60)
            path = env.state_dir / FILE
            path.write_bytes(path.read_bytes()[:1000])
            before = len(_memo_lines(env))
            env.start()
            wait_until(lambda: env.proc.poll() is not None or (
                '"vipd running"' in env.log().rsplit('"vipd stopped"', 1)[-1] and env.accepted() >= N + 1),
                timeout=90, interval=0.3, what="the agent running after a damaged memo")
            assert env.proc.poll() is None, env.log()[-3000:]
            (line,) = [m for m in _memo_lines(env)[before:] if m["event"] == "start-up plan memo"]
            assert line["used"] is False, line
            assert env.connect(vip_of(changed), 80, 1) == ["p0"]
            status = env.vipctl("status")
            assert "Reconcile errors: none" in status, status[-2000:]
        finally:
            if env.proc is not None and env.proc.poll() is None:
                env.proc.terminate()
                env.proc.wait(timeout=60)
            env.cleanup_pins()
