"""The merge pipeline: options, the one validation path (plan), hooks, concept recording
and progress. Drives a host through the ``hosts.base`` protocol."""
