"""Shared pieces of the test doubles for agent.datapath.api.Datapath."""


def upsert_each(dp, svcs) -> dict:
    """Datapath.upsert_services over a fake's upsert_service: failures per service, the others
    programmed (as the real batch falls back to one service at a time)."""
    errors = {}
    for svc in svcs:
        try:
            dp.upsert_service(svc)
        except Exception as exc:  # noqa: BLE001
            errors[svc.key] = exc
    return errors
