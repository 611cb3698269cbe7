"""LinUCB: a contextual bandit with one ridge-regression model per arm, and its policy file.

For arm a with context x (``features.FEATURE_NAMES``), the agent keeps ``A_a = ridge*I +
sum x x^T`` and ``B_a = sum x c^T`` where c are the reward components (``reward.COMPONENTS``).
With the job's weights w, arm a's reward model is the ridge regression shrunk towards the model
pooled over all arms, ``theta_a = A_a^-1 (B_a w + ridge * theta_0)`` with ``theta_0 = (ridge*I +
sum_a (A_a - ridge*I))^-1 sum_a B_a w``: an arm with little data on some content is predicted to
do as the arms do there on average, not zero. It scores ``x^T theta_a + alpha * sqrt(x^T A_a^-1
x)`` (the predicted reward plus an exploration bonus that shrinks as the arm is tried in similar
contexts) and picks the best; exact ties are broken by a ``numpy.random.Generator`` seeded with
the job's seed and the decision's number, so the same seed and the same rewards give the same
decisions, also across a resumed driver. Learning the components instead of the scalar reward
lets one policy serve jobs with different weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from palstream.errors import ConfigError
from palstream.tuner.features import FEATURE_NAMES, features_hash
from palstream.tuner.reward import COMPONENTS, RewardWeights
from palstream.tuner.space import ARM_NAMES, space_hash

POLICY_FORMAT = "palstream-tuner-policy"
POLICY_VERSION = 1
DEFAULT_POLICY = Path(__file__).with_name("default_policy.json")


class LinUCB:
    """Disjoint LinUCB over :data:`ARM_NAMES` with vector-valued rewards.

    Parameters
    ----------
    alpha : float, default 0.5
        Exploration width, in reward units per standard error.
    ridge : float, default 1.0
        Prior precision of each arm's model (``A_a`` starts as ``ridge * I``).
    """

    def __init__(self, alpha: float = 0.5, ridge: float = 1.0):
        if not 0 <= alpha <= 100 or not 0 < ridge <= 1e6:
            raise ConfigError(f"LinUCB needs alpha in 0..100 and ridge in (0, 1e6], got {alpha}, {ridge}")
        d, k = len(FEATURE_NAMES), len(COMPONENTS)
        self.alpha, self.ridge = float(alpha), float(ridge)
        self.A = np.stack([ridge * np.eye(d) for _ in ARM_NAMES])
        self.B = np.zeros((len(ARM_NAMES), d, k))
        self.counts = np.zeros(len(ARM_NAMES), np.int64)

    def _pooled(self, w: np.ndarray) -> np.ndarray:
        """Reward model fitted on every arm's observations together."""
        ridge = self.ridge * np.eye(self.A.shape[1])
        return np.linalg.solve(ridge + (self.A - ridge).sum(axis=0), self.B.sum(axis=0) @ w)

    def predict(self, x: np.ndarray, weights: RewardWeights) -> np.ndarray:
        """Expected reward of every arm at ``x`` (no exploration bonus)."""
        w = np.asarray(weights.vector())
        pooled = self.ridge * self._pooled(w)
        return np.array([float(x @ np.linalg.solve(self.A[i], self.B[i] @ w + pooled)) for i in range(len(ARM_NAMES))])

    def scores(self, x: np.ndarray, weights: RewardWeights) -> np.ndarray:
        """Upper confidence bound of every arm's reward at context ``x``."""
        width = np.array([float(np.sqrt(max(float(x @ np.linalg.solve(a, x)), 0.0))) for a in self.A])
        return self.predict(x, weights) + self.alpha * width

    def choose(self, x: np.ndarray, weights: RewardWeights, seed: int, decision: int) -> str:
        """The arm with the highest bound; ties broken by ``Generator((seed, decision))``."""
        scores = self.scores(x, weights)
        best = np.flatnonzero(scores >= scores.max() - 1e-12)
        pick = best[0] if len(best) == 1 else np.random.default_rng([seed, decision]).choice(best)
        return ARM_NAMES[int(pick)]

    def update(self, arm: str, x: np.ndarray, comps: dict[str, float]) -> None:
        """Add one observation: arm ``arm`` at context ``x`` gave components ``comps``."""
        i = ARM_NAMES.index(arm)
        c = np.array([comps[name] for name in COMPONENTS])
        self.A[i] += np.outer(x, x)
        self.B[i] += np.outer(x, c)
        self.counts[i] += 1

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self, **info) -> dict:
        return {
            "format": POLICY_FORMAT,
            "version": POLICY_VERSION,
            "space": space_hash(),
            "arms": list(ARM_NAMES),
            "features": features_hash(),
            "feature_names": list(FEATURE_NAMES),
            "components": list(COMPONENTS),
            "alpha": self.alpha,
            "ridge": self.ridge,
            "observations": {a: int(n) for a, n in zip(ARM_NAMES, self.counts)},
            "A": {a: self.A[i].tolist() for i, a in enumerate(ARM_NAMES)},
            "B": {a: self.B[i].tolist() for i, a in enumerate(ARM_NAMES)},
            **info,
        }

    @classmethod
    def from_dict(cls, data, where: str) -> LinUCB:
        """Load a policy document; ``where`` names its file in errors."""
        fix = "retrain it with `palstream tune`, or remove [tuner] policy to use the shipped default"
        if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
            raise ConfigError(f"tuner policy {where} is not a palstream tuner policy; {fix}")
        if data.get("version") != POLICY_VERSION:
            raise ConfigError(
                f"tuner policy {where} has format version {data.get('version')!r}, this palstream reads {POLICY_VERSION}; {fix}"
            )
        if data.get("space") != space_hash():
            raise ConfigError(f"tuner policy {where} was trained for other encoder arms than {', '.join(ARM_NAMES)}; {fix}")
        if data.get("features") != features_hash() or data.get("components") != list(COMPONENTS):
            raise ConfigError(f"tuner policy {where} was trained on other features or reward components; {fix}")
        d, k = len(FEATURE_NAMES), len(COMPONENTS)
        try:
            agent = cls(float(data["alpha"]), float(data["ridge"]))
            A = np.array([data["A"][a] for a in ARM_NAMES], dtype=np.float64)
            B = np.array([data["B"][a] for a in ARM_NAMES], dtype=np.float64)
            counts = np.array([int(data["observations"][a]) for a in ARM_NAMES], np.int64)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"tuner policy {where} is missing or has malformed fields (alpha, ridge, A, B, observations); {fix}") from None
        if A.shape != (len(ARM_NAMES), d, d) or B.shape != (len(ARM_NAMES), d, k) or not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise ConfigError(f"tuner policy {where} has matrices of the wrong shape or non-finite values; {fix}")
        if not all(np.all(np.linalg.eigvalsh((m + m.T) / 2) > 0) for m in A):
            raise ConfigError(f"tuner policy {where} has a model matrix that is not positive definite; {fix}")
        agent.A, agent.B, agent.counts = A, B, counts
        return agent

    def save(self, path: str | Path, **info) -> None:
        Path(path).write_text(json.dumps(self.to_dict(**info), indent=1) + "\n")


def load_policy(path: str | Path | None = None) -> LinUCB:
    """The policy at ``path`` (default: the one shipped with palstream)."""
    path = Path(path) if path is not None else DEFAULT_POLICY
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"tuner policy {path} cannot be read ({exc.strerror or exc}); give an existing policy file") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"tuner policy {path} is not valid JSON ({exc}); retrain it with `palstream tune`, or remove [tuner] policy"
        ) from None
    return LinUCB.from_dict(data, str(path))
