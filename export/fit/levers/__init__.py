"""clipfuse.export.fit.levers: `clipfuse fit --budget-ms/--budget-gflops` and `--cascade`, the levers that make
the ensemble cheaper.

Both work on the arrays export/fit/pipeline.py has already computed from cached features (nothing is
re-encoded), with fit's own splits:

    shots   k labelled images per class from the controller's pool (what every controller is fitted on)
    pool - shots   labelled images no controller saw: the budget search SELECTS the subset on them,
                   the cascade chooses its order and thresholds on them (its bound needs no labels)
    eval    the eval split: every figure reported, never used to choose anything

Budget (`choose_budget_subset`): exact search over every subset (export/fit/subsets.py), each fitted
with C-LOG-AVG (K temperatures: 2^K - 1 fits of seconds in all; NLC per subset would be 511 MLP
fits for nine backbones, and export/fit/select.py found C-LOG-AVG no worse at few shots in the
held-out comparisons it makes), priced as the sum of its backbones' costs: ms measured here at
batch 1 (`measure_costs`: ONNX Runtime CPU on the backbone's own tower graph, median after
warm-up, with the machine's load recorded) or GFLOPs as `clipfuse backbones` counts them. The
chosen subset then goes through fit's usual path (study, shipped-method choice, export). The
selection is biased upwards on the images it was chosen on: the eval figure is the one to quote.

Cascade (`plan_cascade`): stage s = the first s backbones of an order with a controller fitted for
exactly them: C-LOG-AVG on the k shots for s < S (cheap: stages x orders fits; the shipped-method
choice per stage would multiply that by select.py's 3 draws x 2 fits, and at one shot per class it
ships C-LOG-AVG anyway), and the controller fit ships (select.py) at the last stage, so the last
stage IS model.onnx. Orders: export/fit/cascade.py candidate_orders on the pool's held-out images;
thresholds: fit_cascade_orders (agreement with the full ensemble, Clopper-Pearson bound).

The modules, by job:

    recipe   Levers: the recipe fit checks (torch-free: the API and CLI build it at import)
    costs    what each backbone costs: GFLOPs counted, or ms timed interleaved on ONNX Runtime CPU
    budget   the best subset within --budget-ms/--budget-gflops, and its frontier plot
    plan     the cascade: calibration count check, order, per-stage controllers and thresholds
    report   the budget and cascade sections of fit's report.md
"""
