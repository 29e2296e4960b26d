"""`spofa bench`: latency and accuracy of a student artifact beside its teacher.

    run.py        entry points: run_bench (a model file), measure (a plan), bench_models (in-memory models)
    plan.py       `BenchOptions`; the plan (`BenchPlan`, `plan_bench`): teacher, variants, batches, data, notes
    teacher.py    the teacher to compare with and how it is obtained: exported like the student, cached beside it
    students.py   several files of one student side by side (`--with`): same-model check, the fp32 reference
    variants.py   which (model, backend, precision) variants run, as `Candidate`s with their runners
    timing.py     the timing method (`measure`, `TimingOptions`) and latency statistics
    loop.py       the interleaved timing rounds, accuracy through the runners, teacher pairing
    report.py     result records -> JSON, PNG (the terminal table is `cli.bench_table`)

The runners are the formats' own (`export.formats`: each format's home). Import the submodules
(`from export.bench.run import run_bench`); this package imports nothing.
"""
