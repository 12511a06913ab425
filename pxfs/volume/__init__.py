"""The node side of a volume: the on-disk replica, coordinator and follower roles, the in-sync set,
log shipping, health and schedules."""
