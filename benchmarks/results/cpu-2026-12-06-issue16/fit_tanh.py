"""The coefficients of the CPU kernels' softcap tanh (`tanh_vector` in
csrc/cpu/attention_kernel/vector_math.inc): tanh(x) = x P(x^2) / Q(x^2) on |x| <= LIMIT,
fitted for relative error by iteratively reweighted (Lawson) linearized least squares in
float64, then evaluated in float32 (Horner, no FMA) against float64 tanh.

    .venv/bin/python fit_tanh.py [NUMERATOR_DEGREE DENOMINATOR_DEGREE [LIMIT]]   # 5 3 9 kept

Degrees (in x^2) and the float32 maximum relative error measured on 2.2 million points of
[1e-30, 9] (2026-12-06): 3/3 6.2e-6, 4/3 9.1e-7, 5/3 3.7e-7 (kept), 6/3 4.1e-7, 4/4 4.0e-7,
5/2 4.2e-6. The float32 evaluation, not the fit (6e-8 for 5/3), bounds the error.
"""

import sys

import numpy as np

numerator_degree = int(sys.argv[1]) if len(sys.argv) > 1 else 5
denominator_degree = int(sys.argv[2]) if len(sys.argv) > 2 else 3
limit = float(sys.argv[3]) if len(sys.argv) > 3 else 9.0

# Chebyshev nodes in u = x^2 / limit^2 (well conditioned powers on [0, 1]).
nodes = 4000
u = (1 - np.cos(np.pi * (np.arange(nodes) + 0.5) / nodes)) / 2
x = np.sqrt(u) * limit
target = np.where(x > 0, np.tanh(x) / np.where(x > 0, x, 1.0), 1.0)  # tanh(x) / x

weights = np.ones(nodes)
previous_denominator = np.ones(nodes)
best = None
for _ in range(200):
    # Unknowns p_0..p_m and q_1..q_n (q_0 = 1): P(u) - target Q(u), relative to target Q.
    powers_p = u[:, None] ** np.arange(numerator_degree + 1)
    powers_q = u[:, None] ** np.arange(1, denominator_degree + 1)
    system = np.hstack([powers_p, -target[:, None] * powers_q])
    row_scale = np.sqrt(weights) / (target * previous_denominator)
    solution, *_ = np.linalg.lstsq(system * row_scale[:, None], target * row_scale, rcond=None)
    p = solution[: numerator_degree + 1]
    q = np.concatenate([[1.0], solution[numerator_degree + 1 :]])
    error = np.polyval(p[::-1], u) / np.polyval(q[::-1], u) / target - 1
    if best is None or np.abs(error).max() < best[0]:
        best = (np.abs(error).max(), p.copy(), q.copy())
    previous_denominator = np.polyval(q[::-1], u)
    weights = weights * np.abs(error)  # Lawson: weight where the error is largest
    weights /= weights.sum()
fit_error, p, q = best
print("fit: max relative error (float64)", fit_error)

# Coefficients in x^2, rounded to float32, evaluated in float32.
p32 = (p / (limit * limit) ** np.arange(numerator_degree + 1)).astype(np.float32)
q32 = (q / (limit * limit) ** np.arange(denominator_degree + 1)).astype(np.float32)
points = np.concatenate(
    [np.linspace(0, limit, 2_000_001, dtype=np.float64)[1:], np.geomspace(1e-30, 1, 200001)]
).astype(np.float32)
square = points * points
numerator = np.full_like(points, p32[-1])
for coefficient in p32[-2::-1]:
    numerator = numerator * square + coefficient
denominator = np.full_like(points, q32[-1])
for coefficient in q32[-2::-1]:
    denominator = denominator * square + coefficient
relative = np.abs((points * numerator / denominator).astype(np.float64) / np.tanh(points.astype(np.float64)) - 1)
print("float32: max relative error", relative.max(), "at", points[relative.argmax()], "mean", relative.mean())
print("numerator (x^0 first)", [float(v) for v in p32])
print("denominator (x^0 first)", [float(v) for v in q32])
