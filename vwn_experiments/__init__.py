"""Training experiments with vwn_transform, kept out of the library package: what ``vwn demo`` and ``vwn study``
run (the reference GPT and its widened twins on Shakespeare bytes, the token-efficiency analysis, plots and JSON).

The library (``vwn_transform``) does not import this package; the command line imports it when a ``demo`` or
``study`` command runs. Installed with vwn_transform (``pip install 'vwn_transform[demo]'`` adds the plotting and
progress-bar dependencies).

Example (about 30 s on 2 CPU cores)::

    >>> from vwn_experiments import DemoSettings, run_demo
    >>> results = run_demo(DemoSettings.quick(), out_dir="vwn_demo_out")  # doctest: +SKIP
    >>> results["token_efficiency"]  # doctest: +SKIP
"""

from .shakespeare import (
    DEFAULT_CPU_THREADS,
    Batches,
    DemoSettings,
    base_model,
    choose_threads,
    evaluate,
    fit_log_linear,
    format_demo_table,
    format_study_table,
    load_corpus,
    make_optimizer,
    resolve_device,
    run_demo,
    run_study,
    token_efficiency,
    tokens_to_reach,
    train_models,
    widened_twin,
)

__all__ = [
    "DEFAULT_CPU_THREADS",
    "Batches",
    "DemoSettings",
    "base_model",
    "choose_threads",
    "evaluate",
    "fit_log_linear",
    "format_demo_table",
    "format_study_table",
    "load_corpus",
    "make_optimizer",
    "resolve_device",
    "run_demo",
    "run_study",
    "token_efficiency",
    "tokens_to_reach",
    "train_models",
    "widened_twin",
]
