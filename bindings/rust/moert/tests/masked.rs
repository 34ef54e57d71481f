//! Padded batches (issue 15 part 4): a masked pass over rows with garbage in the padding gives
//! zero output rows there and, bit for bit, the outputs and expert counts of a pass over the other
//! rows alone; padding and ignored targets leave the loss's mean.

use moert::{Code, Mode, Model, Scope, Session, SessionOptions, IGNORE_TARGET};
use std::path::PathBuf;

fn path(var: &str, file: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../examples/models")
            .join(file),
    }
}

fn token_model() -> Model {
    Model::load(path("MOERT_TEST_MODEL", "tiny_moe.moert")).unwrap()
}

fn hidden_model() -> Model {
    Model::load(path("MOERT_TEST_HIDDEN_MODEL", "tiny_hidden.moert")).unwrap()
}

fn session(model: &Model, mode: Mode) -> Session {
    let mut options = SessionOptions::new().unwrap();
    options
        .mode(mode)
        .unwrap()
        .threads(1)
        .unwrap()
        .seed(7)
        .unwrap();
    Session::new(model, Some(&options)).unwrap()
}

fn batch(rows: usize, seed: usize) -> Vec<i32> {
    (0..rows * 4)
        .map(|i| ((i * 7 + i / 3 + seed * 13) % 64) as i32)
        .collect()
}

/// The rows of `real` (`width` values each) where `mask` is true, rows of `pad` elsewhere.
fn pad_rows<T: Copy>(real: &[T], width: usize, mask: &[bool], pad: T) -> Vec<T> {
    let mut rows = real.chunks(width);
    mask.iter()
        .flat_map(|&keep| {
            if keep {
                rows.next().unwrap().to_vec()
            } else {
                vec![pad; width]
            }
        })
        .collect()
}

fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: [{i}] = {g}, want {w}");
    }
}

#[test]
fn masked_tokens_equal_the_rows_alone() {
    let model = token_model();
    let padded = session(&model, Mode::INFERENCE);
    let alone = session(&model, Mode::INFERENCE);
    let mask = [true, false, true, true, false];
    let real = batch(3, 4);
    // Padding positions hold ids outside the vocabulary [0, 64).
    let mut tokens = pad_rows(&real, 4, &mask, -1);
    *tokens.last_mut().unwrap() = 1 << 30;
    let want = pad_rows(&alone.forward_tokens(&real, 3).unwrap(), 64, &mask, 0.0);
    let got = padded.forward_tokens_masked(&tokens, &mask, 5).unwrap();
    same_bits(&got, &want, "forward_tokens_masked");
    for layer in [2, 4] {
        let counts = padded.expert_counts(layer, Scope::LAST).unwrap();
        assert_eq!(counts, alone.expert_counts(layer, Scope::LAST).unwrap());
        assert_eq!(counts.iter().sum::<i64>(), 3 * 2, "3 rows, top-2");
    }

    // Into a sub-slice of a longer buffer: the rest stays untouched.
    let mut wide = vec![-7f32; 5 * 64 + 2];
    padded
        .forward_tokens_masked_into(&tokens, &mask, 5, &mut wide[1..5 * 64 + 1])
        .unwrap();
    same_bits(&wide[1..5 * 64 + 1], &want, "forward_tokens_masked_into");
    assert_eq!((wide[0], wide[5 * 64 + 1]), (-7.0, -7.0));

    // No padding is the unmasked pass; all padding gives zeros and counts nothing.
    let all = padded.forward_tokens_masked(&real, &[true; 3], 3).unwrap();
    same_bits(&all, &alone.forward_tokens(&real, 3).unwrap(), "no padding");
    let none = padded
        .forward_tokens_masked(&tokens, &[false; 5], 5)
        .unwrap();
    same_bits(&none, &[0.0; 5 * 64], "all padding");
    assert_eq!(padded.expert_counts(2, Scope::LAST).unwrap(), vec![0i64; 8]);
}

#[test]
fn masked_hidden_rows_equal_the_rows_alone_and_get_no_gradient() {
    let model = hidden_model();
    let padded = session(&model, Mode::TRAINING);
    let alone = session(&model, Mode::TRAINING);
    let mask = [false, true, false, true];
    let real = [1.0, -0.5, 0.25, 2.0, 0.125, -1.0, 0.75, 3.0, -2.0, 0.5];
    let mut input = pad_rows(&real, 5, &mask, f32::NAN);
    input[4] = f32::INFINITY;
    let out_alone = alone.forward_hidden(&real, 2).unwrap();
    let want = pad_rows(&out_alone, 5, &mask, 0.0);
    let mut out = [-7f32; 20];
    padded
        .forward_hidden_masked_into(&input, &mask, 4, &mut out)
        .unwrap();
    same_bits(&out, &want, "forward_hidden_masked_into");
    let got = padded.forward_hidden_masked(&input, &mask, 4).unwrap();
    same_bits(&got, &want, "forward_hidden_masked");
    assert_eq!(
        padded.expert_counts(1, Scope::LAST).unwrap(),
        alone.expert_counts(1, Scope::LAST).unwrap()
    );

    let grad_alone = [1.0, 0.5, -1.0, 2.0, 0.25, -0.5, 1.0, 1.0, 0.75, -2.0];
    let mut gin = [-7f32; 20];
    let mut gin_alone = [0f32; 10];
    padded
        .backward(&pad_rows(&grad_alone, 5, &mask, f32::NAN), Some(&mut gin))
        .unwrap();
    alone.backward(&grad_alone, Some(&mut gin_alone)).unwrap();
    same_bits(&gin, &pad_rows(&gin_alone, 5, &mask, 0.0), "input gradient");
}

#[test]
fn a_mask_of_the_wrong_length_is_the_librarys_error() {
    let model = hidden_model();
    let s = session(&model, Mode::INFERENCE);
    let input = [0f32; 15];
    let mut out = [7f32; 15];
    let err = s
        .forward_hidden_masked_into(&input, &[true, true], 3, &mut out)
        .unwrap_err();
    assert_eq!(err.code(), Code::INVALID_ARGUMENT, "{err}");
    for part in ["row mask", "2", "3"] {
        assert!(err.message().contains(part), "{err}");
    }
    assert_eq!(out, [7f32; 15], "a failed call wrote the output");
    let err = s.forward_hidden_masked(&input, &[], 3).unwrap_err();
    assert_eq!(err.code(), Code::INVALID_ARGUMENT, "{err}");

    let tokens = token_model();
    let t = session(&tokens, Mode::INFERENCE);
    let err = t
        .forward_tokens_masked(&batch(2, 1), &[true; 3], 2)
        .unwrap_err();
    assert_eq!(err.code(), Code::INVALID_ARGUMENT, "{err}");
    assert!(err.message().contains("row mask"), "{err}");
}

fn cross_entropy(logits: &[f32], row: usize, target: usize) -> f64 {
    let z = &logits[row * 64..(row + 1) * 64];
    let max = z
        .iter()
        .map(|&v| f64::from(v))
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = z.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    max + sum.ln() - f64::from(z[target])
}

#[test]
fn backward_loss_leaves_out_padding_and_ignored_targets() {
    let model = token_model();
    let padded = session(&model, Mode::TRAINING);
    let alone = session(&model, Mode::TRAINING);
    let aux_only = session(&model, Mode::TRAINING);
    let mask = [true, false, true, true, false];
    let real = batch(3, 9);
    padded
        .forward_tokens_masked(&pad_rows(&real, 4, &mask, 64), &mask, 5)
        .unwrap();
    // Rows 1 and 4 are padding with garbage targets; row 2 takes part with no target.
    let loss = padded
        .backward_loss(&[5, 12345, IGNORE_TARGET, 17, -3])
        .unwrap();
    let logits = alone.forward_tokens(&real, 3).unwrap();
    let loss_alone = alone.backward_loss(&[5, IGNORE_TARGET, 17]).unwrap();
    assert_eq!(
        loss.to_bits(),
        loss_alone.to_bits(),
        "{loss} vs {loss_alone}"
    );
    // With every target ignored, only the auxiliary losses remain.
    aux_only.forward_tokens(&real, 3).unwrap();
    let aux = aux_only.backward_loss(&[IGNORE_TARGET; 3]).unwrap();
    let want = (cross_entropy(&logits, 0, 5) + cross_entropy(&logits, 2, 17)) / 2.0 + aux;
    assert!((loss - want).abs() < 1e-5, "loss {loss}, want {want}");
    same_bits(
        &padded.get_gradient("head.weight").unwrap(),
        &alone.get_gradient("head.weight").unwrap(),
        "head.weight gradient",
    );
}
