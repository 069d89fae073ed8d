"""The KSM tuner: ``decide`` (pure: observation and state in, knobs out; one
step per mode), ``reading`` (pure: what KSM's counters say: cost, convergence,
churn) and ``loop`` (collect, act, the one-tuner-per-host lock), shared by `vmshare tune`
and the daemon. Its settings type is ``vmshare.config.TunerPolicy``.

May import records (audit), ksm, config and errors.
"""
