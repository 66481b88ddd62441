"""Fault injection: real ``kill -9``, damaged and hostile inputs, full disks (issue 7)."""
