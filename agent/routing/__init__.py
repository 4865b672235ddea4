"""Kernel routes owned by vipd: route values and the plan (model.py), the netlink owner (manager.py)."""
