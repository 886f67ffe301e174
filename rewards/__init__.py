"""Reward functions for the policy stages: registry, math, sandboxed code, safety, learned RMs.

The registry and the built-in rewards land with the rewards issue; recipes already name them
(`rewards: [{name: math, weight: 1.0}]`).
"""
