"""The batch policy, pure (no trio, no torch): which requests wait, join, step and end, and why.

actors/scheduler.py is the loop that applies it: it turns messages into calls here, runs the
steps this plans in a worker thread, and sends what comes back to each request's relay.
"""
