"""A scikit-learn SVM head (``SVC(kernel="rbf", probability=True)``, saved with
joblib) as TensorFlow ops in the deploy graph, so tf2onnx converts it with the
feature extractor into one ONNX graph and every backend runs it.

What scikit-learn computes, read from its bundled libsvm (``svm.cpp``,
``predict_probability``) and reproduced here step by step:

1. One decision value per class pair (i < j), in ``classes_`` order:
   f_ij(x) = sum over the support vectors of classes i and j of
   coef * exp(-gamma * |x - sv|^2) - rho_ij. Positive means class i.
   (scikit-learn's public ``dual_coef_``/``intercept_`` are negated for two
   classes; the internal ones are libsvm's and are used here.)
2. Platt scaling per pair: r_ij = clip(1 / (1 + exp(A_ij f_ij + B_ij)),
   1e-7, 1 - 1e-7), r_ji = 1 - r_ij (``probA_``, ``probB_``).
3. Pairwise coupling (Wu, Lin and Weng's method 2): p minimises p'Qp on the
   simplex, found *iteratively* from p = 1/k, checking max|Qp - p'Qp| < 0.005/k
   before each sweep, at most max(100, k) sweeps. libsvm runs this for two
   classes too, so even a binary SVC's ``predict_proba`` is not the closed-form
   Platt sigmoid (they differ by up to ~4e-3). Here it is a ``tf.while_loop``
   (an ONNX ``Loop``) over the batch with a per-image "converged" mask, so each
   image stops at the sweep where libsvm stops and the result matches
   ``predict_proba`` to float32 rounding, not merely the coupling's exact
   optimum.

The Grad-CAM score of class c is the one-vs-one vote margin
s_c = sum_{j != c} f_cj (with f_ji = -f_ij): for two classes s_1 = -f_01 is
scikit-learn's ``decision_function`` and s_0 = -s_1, the same convention as a
single sigmoid unit's logit. Its gradient is taken inside the graph.

A joblib file is a pickle: loading it runs code named in the file. It is loaded
only with ``trust_code`` (``--trust-code``); otherwise it is refused, naming
what it would import, before anything is read into Python objects.
"""
from __future__ import annotations

import pickletools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from armscope.core.errors import ArmscopeError

MIN_PROB = 1e-7  # libsvm's clip of each pairwise probability
HEAD_SUFFIXES = (".joblib", ".pkl", ".pickle")
SCORE = ("the SVM's one-vs-one vote margin s_c = sum over the other classes j of the decision value f_cj "
         "(f_ji = -f_ij; for two classes s_1 = decision_function, s_0 = -s_1)")


def pickle_imports(path: Path, limit: int = 6) -> list[str]:
    """The globals a pickle would import, read with ``pickletools`` (no code runs).
    joblib stores numpy arrays as raw bytes inside the stream, where the opcode
    scan stops; what was found before that is returned."""
    found: list[str] = []
    pending: list[str] = []  # STACK_GLOBAL takes module and name from the two last strings
    try:
        with open(path, "rb") as handle:
            for op, arg, _ in pickletools.genops(handle):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                    pending = (pending + [str(arg)])[-2:]
                    continue
                if op.name == "MEMOIZE":
                    continue
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(pending) == 2:
                    found.append(".".join(pending))
                pending = []  # only two strings pushed right before STACK_GLOBAL name it for sure
                if len(dict.fromkeys(found)) >= limit:
                    break
    except Exception:  # noqa: BLE001 - raw array bytes or a compressed stream end the scan
        pass
    return list(dict.fromkeys(found))


def refuse_pickle(path: Path) -> None:
    names = pickle_imports(path)
    what = f"it would import {', '.join(names)}" if names else "its contents are not inspected"
    raise ArmscopeError(
        f"{path}: the SVM head file is a pickle (joblib) and carries code ({what}); loading it would run that "
        "code. Refused by default: pass --trust-code only if you trust whoever made this file")


@dataclass
class SvmHead:
    """An SVC's parameters as float64 arrays, in libsvm's conventions (see module docstring)."""

    source: str
    classes: list[str]
    n_features: int
    mean: np.ndarray | None  # StandardScaler before the SVC, or None
    scale: np.ndarray | None
    support_vectors: np.ndarray  # (nSV, D)
    dec_coef: np.ndarray  # (nSV, P): coefficient of each support vector in each pair's decision value
    dec_bias: np.ndarray  # (P,) = -rho
    prob_a: np.ndarray  # (P,)
    prob_b: np.ndarray  # (P,)
    gamma: float
    pairs: list[tuple[int, int]]
    estimator: object = None  # the loaded object itself (its predict_proba is the parity reference)

    def predict_proba(self, v: np.ndarray) -> np.ndarray:
        """scikit-learn's own probabilities for features ``v`` (warnings about its deprecations kept quiet)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.estimator.predict_proba(np.asarray(v, np.float64))

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def vote(self) -> np.ndarray:
        """(P, C): s_c = sum_p vote[p, c] f_p, +1 for the pair's first class, -1 for its second."""
        m = np.zeros((len(self.pairs), self.n_classes))
        for p, (i, j) in enumerate(self.pairs):
            m[p, i], m[p, j] = 1.0, -1.0
        return m

    def describe(self) -> str:
        scaler = "StandardScaler -> " if self.mean is not None else ""
        return (f"{scaler}SVC(kernel='rbf', gamma={self.gamma:.4g}) with {len(self.support_vectors)} support vectors "
                f"over {self.n_features} features, {self.n_classes} classes {self.classes}; Platt scaling and "
                "libsvm's pairwise coupling in the graph")

    # -- TensorFlow ops ------------------------------------------------------------------------------
    # No MatMul/Gemm/Conv anywhere here: the INT8 quantizer quantizes those op types only, and the RBF
    # kernel (a difference of nearly equal squared distances) and the coupling must stay FP32.
    def kernel(self, v):
        """(B, D) features -> (x, K): the scaled features (B, D) and RBF kernel values (B, nSV)."""
        import tensorflow as tf

        x = v
        if self.mean is not None:
            x = (x - tf.constant(self.mean, tf.float32)) / tf.constant(self.scale, tf.float32)
        sv = tf.constant(self.support_vectors[None], tf.float32)
        d2 = tf.reduce_sum(tf.square(tf.expand_dims(x, 1) - sv), axis=-1)
        return x, tf.exp(-self.gamma * d2)

    def decision_values(self, kernel):
        """(B, nSV) kernel values -> (B, P) libsvm decision values f_ij."""
        import tensorflow as tf

        coef = tf.constant(self.dec_coef[None], tf.float32)
        return tf.reduce_sum(tf.expand_dims(kernel, 2) * coef, axis=1) + tf.constant(self.dec_bias, tf.float32)

    def score_gradient(self, x, kernel, channels: slice):
        """d s_c / d v for the features in ``channels``, (B, C, len): closed form of the RBF kernel's
        derivative, dK_i/dx = -2 gamma K_i (x - sv_i), through the scaler (dx/dv = 1/scale). Exact, and
        the same function tf.GradientTape would give; written out because TensorFlow's gradient of the
        broadcasting ops has no ONNX conversion (DynamicStitch, StridedSliceGrad)."""
        import tensorflow as tf

        weights = self.dec_coef @ self.vote  # (nSV, C): s_c = sum_i weights[i, c] K_i + const
        wk = tf.expand_dims(kernel, 2) * tf.constant(weights[None], tf.float32)  # (B, nSV, C)
        total = tf.reduce_sum(wk, axis=1)  # (B, C)
        sv = tf.constant(self.support_vectors[None, :, None, channels], tf.float32)  # (1, nSV, 1, K)
        pulled = tf.reduce_sum(tf.expand_dims(wk, 3) * sv, axis=1)  # (B, C, K)
        xs = tf.expand_dims(x[:, channels], 1)  # (B, 1, K)
        grad = -2.0 * self.gamma * (tf.expand_dims(total, 2) * xs - pulled)
        if self.scale is not None:
            grad = grad / tf.constant(self.scale[None, None, channels], tf.float32)
        return grad

    def scores(self, dec):
        """(B, P) -> (B, C) Grad-CAM scores (``SCORE``)."""
        import tensorflow as tf

        vote = tf.constant(self.vote, tf.float32)
        return tf.reduce_sum(dec[:, :, None] * vote[None], axis=1)

    def probabilities(self, dec):
        """(B, P) -> (B, C): Platt scaling, then libsvm's iterative pairwise coupling."""
        import tensorflow as tf

        k = self.n_classes
        r_pair = tf.sigmoid(-(dec * tf.constant(self.prob_a, tf.float32) + tf.constant(self.prob_b, tf.float32)))
        r_pair = tf.clip_by_value(r_pair, MIN_PROB, 1.0 - MIN_PROB)
        # r[b, i, j] for i != j: r_ij for the pair (i, j), i < j, and 1 - r_ij below the diagonal
        upper = np.zeros((len(self.pairs), k, k), np.float32)
        lower = np.zeros((len(self.pairs), k, k), np.float32)
        for p, (i, j) in enumerate(self.pairs):
            upper[p, i, j] = 1.0
            lower[p, j, i] = 1.0
        r = (tf.reduce_sum(r_pair[:, :, None, None] * tf.constant(upper[None]), axis=1)
             + tf.reduce_sum((1.0 - r_pair)[:, :, None, None] * tf.constant(lower[None]), axis=1))
        # Q[t, t] = sum_j r_jt^2, Q[t, j] = -r_jt r_tj (the diagonal of r is 0)
        q_diag = tf.reduce_sum(tf.square(r), axis=1)  # (B, k)
        q = q_diag[:, :, None] * tf.constant(np.eye(k, dtype=np.float32)[None]) - tf.transpose(r, (0, 2, 1)) * r
        eps = 0.005 / k
        max_iter = max(100, k)
        batch = tf.shape(dec)[0]
        p0 = tf.fill(tf.stack([batch, k]), 1.0 / k)
        done0 = tf.zeros(tf.stack([batch]), tf.bool)

        def check(p):
            qp = tf.reduce_sum(q * p[:, None, :], axis=2)
            pqp = tf.reduce_sum(p * qp, axis=1, keepdims=True)
            return qp, pqp, tf.reduce_max(tf.abs(qp - pqp), axis=1) < eps

        def cond(it, p, done):
            return tf.logical_and(it < max_iter, tf.logical_not(tf.reduce_all(done)))

        def body(it, p, done):
            qp, pqp, converged = check(p)
            done = tf.logical_or(done, converged)
            new = p
            for t in range(k):  # one Gauss-Seidel sweep, as libsvm
                diff = (-qp[:, t:t + 1] + pqp) / q_diag[:, t:t + 1]
                onehot = tf.one_hot(t, k, dtype=p.dtype)[None]
                new = new + diff * onehot
                pqp = (pqp + diff * (diff * q_diag[:, t:t + 1] + 2.0 * qp[:, t:t + 1])) / (1.0 + diff) / (1.0 + diff)
                qp = (qp + diff * q[:, t, :]) / (1.0 + diff)
                new = new / (1.0 + diff)
            return it + 1, tf.where(done[:, None], p, new), done

        _, p, _ = tf.while_loop(cond, body, (tf.constant(0), p0, done0))
        return p

    # -- NumPy (float64) reference of the same steps, for checks ---------------------------------------
    def numpy_decision_values(self, v: np.ndarray) -> np.ndarray:
        x = np.asarray(v, np.float64)
        if self.mean is not None:
            x = (x - self.mean) / self.scale
        d2 = ((x[:, None, :] - self.support_vectors[None]) ** 2).sum(-1)
        return np.exp(-self.gamma * d2) @ self.dec_coef + self.dec_bias


def _unwrap(obj, path: Path):
    """(mean, scale, svc) from an SVC or a Pipeline of [StandardScaler,] SVC; refuse anything else by name."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    mean = scale = None
    svc = obj
    if isinstance(obj, Pipeline):
        steps = [s for _, s in obj.steps if s not in (None, "passthrough")]
        if len(steps) == 2 and isinstance(steps[0], StandardScaler):
            scaler, svc = steps
            mean = scaler.mean_ if scaler.with_mean else np.zeros(scaler.n_features_in_)
            scale = scaler.scale_ if scaler.with_std else np.ones(scaler.n_features_in_)
        elif len(steps) != 1:
            kinds = " -> ".join(type(s).__name__ for s in steps)
            raise ArmscopeError(f"{path}: a Pipeline {kinds}; supported SVM heads: SVC, or a Pipeline of "
                                "StandardScaler -> SVC")
        else:
            svc = steps[0]
    if not isinstance(svc, SVC):
        raise ArmscopeError(f"{path}: holds a {type(svc).__module__}.{type(svc).__name__}; expected a scikit-learn "
                            "SVC (or a Pipeline of StandardScaler -> SVC)")
    if not hasattr(svc, "support_vectors_"):
        raise ArmscopeError(f"{path}: the SVC is not fitted")
    if svc.kernel != "rbf":
        raise ArmscopeError(f"{path}: SVC kernel {svc.kernel!r}; supported: 'rbf'")
    if getattr(svc, "_sparse", False):
        raise ArmscopeError(f"{path}: the SVC was fitted on sparse data; expected dense features")
    if np.size(getattr(svc, "_probA", [])) == 0:
        raise ArmscopeError(f"{path}: the SVC was fitted without probability=True; it has no Platt scaling "
                            "(probA_/probB_), so it gives no probabilities to deploy")
    return mean, scale, svc


def load_svm_head(path: str | Path, trust_code: bool = False) -> SvmHead:
    """Read a joblib/pickle SVM head (only with ``trust_code``) into an ``SvmHead``."""
    path = Path(path)
    if not path.is_file():
        raise ArmscopeError(f"{path}: no such SVM head file")
    if path.suffix.lower() not in HEAD_SUFFIXES:
        raise ArmscopeError(f"{path}: unsupported SVM head file type {path.suffix!r}; expected a joblib or pickle "
                            f"file ({', '.join(HEAD_SUFFIXES)})")
    if not trust_code:
        refuse_pickle(path)
    import joblib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn version and deprecation notices
            obj = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - unpickling raises anything
        raise ArmscopeError(f"{path}: could not be loaded with joblib ({type(exc).__name__}: "
                            f"{str(exc).strip()[:200]})") from None
    mean, scale, svc = _unwrap(obj, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prob_a, prob_b = np.asarray(svc._probA, np.float64), np.asarray(svc._probB, np.float64)
    classes = [str(c) for c in svc.classes_]
    k = len(classes)
    support = np.asarray(svc.support_vectors_, np.float64)
    counts = np.asarray(svc.n_support_)
    start = np.concatenate([[0], np.cumsum(counts)])
    dual = np.asarray(svc._dual_coef_, np.float64)  # (k - 1, nSV), libsvm's signs
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    coef = np.zeros((len(support), len(pairs)))
    for p, (i, j) in enumerate(pairs):
        si, sj = slice(start[i], start[i + 1]), slice(start[j], start[j + 1])
        coef[si, p] = dual[j - 1, si]
        coef[sj, p] = dual[i, sj]
    return SvmHead(source=str(path), classes=classes, n_features=int(support.shape[1]), mean=mean, scale=scale,
                   support_vectors=support, dec_coef=coef, dec_bias=np.asarray(svc._intercept_, np.float64),
                   prob_a=prob_a, prob_b=prob_b, gamma=float(svc._gamma), pairs=pairs, estimator=obj)
