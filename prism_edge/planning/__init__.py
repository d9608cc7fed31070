"""Choosing a request's plan: what the probes measured (profile), what a plan will cost (cost), which to run
(planner).  Plain data and arithmetic: the probes themselves run in the device processes (cluster/probes.py)."""

from .cost import CONSTANTS, Constants, Estimate, ModelCost, estimate
from .planner import FIDELITIES, Candidate, Choice, Drift, Planner, candidate_config, check_fidelity, speed_weights
from .profile import DeviceProfile, LinkProfile, Profile

__all__ = ["CONSTANTS", "Candidate", "Choice", "Constants", "Drift", "DeviceProfile", "Estimate", "FIDELITIES", "LinkProfile", "ModelCost", "Planner",
           "Profile", "candidate_config", "check_fidelity", "estimate", "speed_weights"]
