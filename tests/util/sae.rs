//! An SAE detector folder for the tests: a small TopK SAE trained by `sae-train`.

use darkwatch::sae::dark::DarkConfig;
use darkwatch::sae::eval::{SaeTrainArgs, SaeTrainSummary, sae_train_command};
use darkwatch::sae::train::{SaeTrainConfig, SaveMeta};

/// Trains a TopK SAE of `latents` latents (k active, 3 epochs, seed 0) on the bundled
/// all-MiniLM-L6-v2 activations (tests/data/activations, d = 384) into `out`, as
/// `darkwatch sae-train` does: the SAELens folder, its dark-matter head (ridge 1) and the
/// calibration on the 20 % of prompts held out.
pub fn train_detector(out: &std::path::Path, latents: usize, k: usize) -> SaeTrainSummary {
    let a = super::repo("tests/data/activations");
    let args = SaeTrainArgs {
        input: a.join("train.npy"),
        tensor: None,
        prompt_ids: Some(a.join("train_prompt_ids.npy")),
        prompt_ids_tensor: None,
        out: out.to_path_buf(),
        holdout: 0.2,
        skip_positions: None,
        config: SaeTrainConfig {
            latents,
            k,
            epochs: 3,
            seed: 0,
            ..Default::default()
        },
        dark: DarkConfig { ridge: 1.0 },
        dark_folds: 0,
        meta: SaveMeta::default(),
        force: false,
    };
    sae_train_command(&args, &mut |_| {}).unwrap().0
}
