"""Sources of desired state. Each one only writes snapshots into :class:`agent.store.Store`."""
