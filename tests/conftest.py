"""Shared fixtures: every test session gets its own empty cache and no network downloads."""
import os
import tempfile

import pytest

_SESSION_CACHE = tempfile.mkdtemp(prefix="lab-test-cache-")
os.environ["COMPRESSION_LAB_CACHE"] = _SESSION_CACHE
os.environ["COMPRESSION_LAB_OFFLINE"] = "1"
os.environ.pop("RAY_ADDRESS", None)   # the tests start their own engine (and their own test clusters)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see docs/teachers.md (threads)
os.environ.setdefault("COMPRESSION_LAB_DATA", os.path.join(_SESSION_CACHE, "data"))


# the quick loop (`bash tests/run.sh --quick`) leaves these out: real browsers, real clusters, simulated
# classes, exports and per-layer tables of every technique (one module-wide set of runs each), and the tests
# that took 6 s or more in a full run (mostly training: fine-tuning, distillation, teachers)
SLOW_FILES = {"test_browser.py", "test_cluster.py", "test_classroom.py", "test_export.py", "test_layers.py"}
SLOW_TESTS = {
    "test_allocation.py::test_int8_keeps_the_most_fragile_layers_in_fp32",
    "test_allocation.py::test_mixed_precision_meets_the_average_bits_and_loads_back",
    "test_allocation.py::test_structured_allocation_meets_the_macs_target",
    "test_allocation.py::test_int8_falls_back_to_the_architectures_fp32_layers_after_the_scans",
    "test_allocation.py::test_structured_allocation_keeps_the_best_measured_candidate",
    "test_allocation.py::test_unstructured_allocation_zeroes_as_many_weights",
    "test_app.py::test_pipeline_page_adds_a_step_runs_and_draws_every_step",
    "test_app.py::test_pruning_slider_change_and_distillation_run",
    "test_app.py::test_teacher_page_estimates_the_training_time_for_the_current_settings",
    "test_app.py::test_teacher_page_shows_the_cached_teacher",
    "test_class_mode.py::test_the_password_unlocks_every_action_and_log_out_locks_them_again",
    "test_distillation.py::test_an_interrupted_distillation_resumes_after_its_last_finished_epoch",
    "test_distillation.py::test_distill_experiment_scratch_cache_and_repeat",
    "test_jobs.py::test_a_killed_interactive_worker_retries_and_the_store_stays_consistent",
    "test_jobs.py::test_a_killed_long_worker_fails_the_job_with_a_clear_message",
    "test_jobs.py::test_long_jobs_pause_while_a_slider_job_runs_on_their_node",
    "test_measure.py::test_a_trained_model_is_measured_again_not_trained_again_on_another_eval_size",
    "test_measure.py::test_cpu_server_target_is_recorded_and_times_batch1_on_every_core",
    "test_packfile.py::test_evaluate_reproduces_the_reported_accuracy",
    "test_pipeline.py::test_a_changed_last_step_reuses_the_first_and_the_file_is_the_reported_size",
    "test_pipeline.py::test_a_pipeline_can_end_in_real_int8",
    "test_pipeline.py::test_the_file_loads_back_to_the_reported_accuracy",
    "test_pipeline.py::test_the_pipeline_command_prints_the_contract",
    "test_prepare.py::test_estimate_is_within_2x_of_a_measured_epoch",
    "test_prepare.py::test_overall_progress_counts_each_models_own_batch_size",
    "test_prepare.py::test_prepare_resumes_without_retraining_finished_epochs",
    "test_prepare.py::test_recipe_beats_plain_loop_after_the_same_steps",
    "test_pruning.py::test_bn_correction_after_unstructured_pruning",
    "test_pruning.py::test_finetuning_uses_the_recipe_precision",
    "test_pruning.py::test_interrupted_finetuning_resumes_with_its_pruned_weights_and_masks",
    "test_pruning.py::test_structured_densenet121_concatenations",
    "test_pruning.py::test_structured_resnet34_shrinks_finetunes_reloads_and_caches",
    "test_pruning.py::test_unstructured_finetune_keeps_zeros_dense_size_unchanged_gzip_smaller",
    "test_qat.py::test_finetune_trains_weights_keeps_batch_norm_statistics_and_removes_its_hooks",
    "test_qat.py::test_int8_with_qat_reports_history_and_stays_faithful_to_the_finetuned_model",
    "test_quantization.py::test_auto_fp32_layers_falls_back_when_int8_disagrees",
    "test_quantization.py::test_fake_8bit_small_drop_packed_size_reload_and_cache",
    "test_quantization.py::test_fp16_runs_and_halves_the_file",
    "test_quantization.py::test_fp32_layer_candidates_share_one_calibration",
    "test_quantization.py::test_int8_densenet121_converts_with_progress",
    "test_quantization.py::test_int8_resnet34_smaller_faithful_reloads",
    "test_quantization.py::test_slim_quant_params_same_session_fewer_bytes",
    "test_sensitivity.py::test_cli_contract_cache_and_job_kind",
    "test_sensitivity.py::test_layers_page_shows_the_cached_scan",
    "test_store_cli.py::test_cli_process_exit_code_and_single_stderr_line",
    "test_store_cli.py::test_train_json_then_served_from_cache",
    "test_sweep.py::test_sweep_is_resumable_and_reports_best_technique",
    "test_training_cache.py::test_bf16_precision_runs_layers_in_bf16_keeps_fp32_weights_and_learns",
    "test_training_cache.py::test_corrupt_cache_entry_is_reported_and_treated_as_missing",
    "test_training_cache.py::test_interrupted_training_leaves_no_finished_teacher_and_resumes",
    "test_training_cache.py::test_short_training_beats_chance_on_offline_default",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES or f"{item.path.name}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    """The session's cache holds hundreds of MB of models: gone afterwards unless asked to keep it.
    The job layer's Ray workers (started by the first test that submits a job) stop first."""
    from core import jobs
    jobs.shutdown()
    if not os.environ.get("LAB_KEEP_TEST_CACHE"):
        import shutil
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shapes():
    from core.datasets import load_dataset
    return load_dataset("shapes")


@pytest.fixture(scope="session")
def make_teacher(shapes):
    """Train (once per session, then from the cache) a small-budget teacher on the offline default."""
    from core.teachers import TeacherSettings, get_teacher
    from core.training import TrainConfig

    def make(model="resnet34", epochs=1, subset=1500, batch_size=64):
        cfg = TrainConfig(epochs=epochs, subset=subset, batch_size=batch_size, lr=0.05)
        return get_teacher(shapes, TeacherSettings(model, cfg), device="cpu", measure=False)
    return make


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A test that must start from an empty cache (cache tests, CLI exit codes)."""
    monkeypatch.setenv("COMPRESSION_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
