"""``make demo``: a real dispatcher and two agents in two pools run a few thousand tasks."""
