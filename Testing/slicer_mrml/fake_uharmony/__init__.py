"""A stand-in for `python -m uharmony segment` that speaks the same protocol (tests only).

It lets the logic tests control timing and failures precisely (slow stages for cancel, a chosen
exit code and message), independently of the real model. Behaviour by environment variable:
FAKE_UHARMONY_DELAY (seconds per infer step), FAKE_UHARMONY_FAIL ("code:message"),
FAKE_UHARMONY_PIDFILE (write the worker's pid there), FAKE_UHARMONY_STRAY (print a non-JSON line).
The label map: intensity tertiles of the foreground -> labels 1..3, on the input's own grid.
"""
