"""Prove an artifact against the reference model, down to the router.

    from mixbuild.validate.compare import validate
    from mixbuild.validate.data import evaluation_batches
    from mixbuild.validate.hf_runner import HFRunner
    from mixbuild.validate.report import print_summary, write_report
    from mixbuild.validate.tolerances import load_tolerances

    reference = HFRunner(checkpoint, router_logits=True, hidden_states=True, moe_inputs=True)
    batches = evaluation_batches(checkpoint, prompts=None, max_tokens=128, batch_size=4,
                                 bos_id=reference.spec.bos_token_id)
    report = validate(reference, artifact_runner, reference.spec, batches, steps=32,
                      tolerances=load_tolerances("fp8"))
    write_report(report, "validation")
    print_summary(report)

Modules: metrics (pure numpy), tolerances (+ tolerances.json), data, experts, compare, result,
report, hf_runner (the transformers oracle). Nothing heavy is imported here.
"""
