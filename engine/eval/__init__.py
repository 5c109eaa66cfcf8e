"""Evaluation: what every task scores with, split over the ranks by one protocol (``engine.eval.lockstep``).

Multi-view clip scoring, AVA frame-mAP and keyframe scoring, k-NN, cached features, reconstruction pictures,
and the tables a frozen-encoder evaluation reports. It imports the platform, ``datasets`` and ``models``; never a
task.
"""
