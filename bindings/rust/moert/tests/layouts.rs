//! Every kind of slice safe Rust can make — of a Vec, a Box, an Arc, a static, an array on the
//! stack, a field of a struct holding references, a sub-slice at any offset, a chunk, an empty
//! slice — as input and output of every entry point that takes caller memory: answers equal those
//! of plain Vecs, memory outside the slice is untouched, a failed call writes nothing.

use moert::{Batcher, Code, Mode, Model, Session, SessionOptions};
use std::path::PathBuf;
use std::sync::Arc;

fn path(var: &str, file: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../examples/models")
            .join(file),
    }
}

fn hidden_model() -> Model {
    Model::load(path("MOERT_TEST_HIDDEN_MODEL", "tiny_hidden.moert")).unwrap()
}

fn token_model() -> Model {
    Model::load(path("MOERT_TEST_MODEL", "tiny_moe.moert")).unwrap()
}

static INPUT: [f32; 10] = [1.0, -0.5, 0.25, 2.0, 0.125, 3.0, 0.5, -1.0, 0.0, 0.75];
static IDS: [i32; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

struct Holder<'a> {
    owner: &'a str,
    values: [f32; 10],
    out: [f32; 16],
    next: Option<Box<Holder<'a>>>,
}

#[test]
fn hidden_inputs_and_outputs_in_every_kind_of_slice() {
    let model = hidden_model();
    assert_eq!(
        model.vocab_size().unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
    let s = Session::new(&model, None).unwrap();
    let b = Batcher::new(&model, None).unwrap();
    let want = s.forward_hidden(&INPUT, 2).unwrap();

    let on_stack: [f32; 10] = INPUT;
    let boxed: Box<[f32]> = INPUT.to_vec().into_boxed_slice();
    let shared: Arc<[f32]> = Arc::from(&INPUT[..]);
    let mut padded = [9.0f32; 23];
    padded[7..17].copy_from_slice(&INPUT);
    let holder = Holder {
        owner: "h",
        values: INPUT,
        out: [0.0; 16],
        next: None,
    };
    let inputs: Vec<(&str, &[f32])> = vec![
        ("static", &INPUT),
        ("stack array", &on_stack),
        ("box", &boxed),
        ("arc", &shared),
        ("sub-slice at offset 7", &padded[7..17]),
        ("struct field", &holder.values),
    ];
    for (name, input) in inputs {
        assert_eq!(s.forward_hidden(input, 2).unwrap(), want, "{name}");
        assert_eq!(
            b.forward_hidden(input, 2).unwrap().0,
            want,
            "batcher {name}"
        );
        // Into the middle of a larger buffer, and into a struct field.
        let mut big = [-3.0f32; 30];
        s.forward_hidden_into(input, 2, &mut big[11..21]).unwrap();
        assert_eq!(&big[11..21], &want[..], "{name}");
        assert!(
            big[..11].iter().chain(&big[21..]).all(|&x| x == -3.0),
            "{name}: wrote outside"
        );
        big.fill(-3.0);
        b.forward_hidden_into(input, 2, &mut big[3..13]).unwrap();
        assert_eq!(&big[3..13], &want[..], "batcher {name}");
        let mut h = Holder {
            owner: name,
            values: [0.0; 10],
            out: [5.0; 16],
            next: None,
        };
        s.forward_hidden_into(input, 2, &mut h.out[6..16]).unwrap();
        assert_eq!(&h.out[6..], &want[..], "{name} into a struct field");
        assert_eq!(h.out[5], 5.0);
        h.next = Some(Box::new(Holder {
            owner: h.owner,
            values: h.values,
            out: [0.0; 16],
            next: None,
        }));
    }
    // Row by row through chunks of one buffer, against each row copied into a Vec of its own.
    for (r, row) in INPUT.chunks(5).enumerate() {
        let own = row.to_vec();
        assert_eq!(
            s.forward_hidden(row, 1).unwrap(),
            s.forward_hidden(&own, 1).unwrap(),
            "chunk {r}"
        );
    }
    // Empty slices and wrong lengths are errors; a failed call leaves the output as it was.
    let mut out = [7.0f32; 10];
    for bad in [&INPUT[..0], &INPUT[..9], &padded[23..]] {
        let e = s.forward_hidden_into(bad, 2, &mut out).unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
        let e = b.forward_hidden_into(bad, 2, &mut out).unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
        assert_eq!(out, [7.0; 10]);
    }
    let e = s.forward_hidden_into(&INPUT, 2, &mut []).unwrap_err();
    assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
    assert_eq!(holder.owner, "h");
}

#[test]
fn token_training_and_model_bytes_in_every_kind_of_slice() {
    let model = token_model();
    let s = Session::new(&model, None).unwrap();
    let b = Batcher::new(&model, None).unwrap();
    let want = s.forward_tokens(&IDS, 2).unwrap();
    let mut padded = [0i32; 13];
    padded[5..13].copy_from_slice(&IDS);
    let stack = IDS;
    for ids in [
        &IDS[..],
        &stack[..],
        &padded[5..],
        &Arc::<[i32]>::from(&IDS[..])[..],
    ] {
        assert_eq!(s.forward_tokens(ids, 2).unwrap(), want);
        assert_eq!(b.forward_tokens(ids, 2).unwrap().0, want);
    }

    let mut options = SessionOptions::new().unwrap();
    options.mode(Mode::TRAINING).unwrap();
    let t = Session::new(&model, Some(&options)).unwrap();
    t.forward_tokens(&padded[5..], 2).unwrap();
    let targets = [0i32, 5, 9, 0];
    t.backward_loss(&targets[1..3]).unwrap();
    let w = t.get_parameter("head.weight").unwrap();
    let mut framed = vec![1.0f32; w.len() + 8];
    framed[4..4 + w.len()].copy_from_slice(&w);
    t.set_parameter("head.weight", &framed[4..4 + w.len()])
        .unwrap();
    t.set_gradient("head.weight", &framed[4..4 + w.len()])
        .unwrap();
    assert_eq!(t.get_gradient("head.weight").unwrap(), w);
    let bias = [0.0f32, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25];
    t.set_expert_bias(2, &bias[1..]).unwrap();
    assert_eq!(t.expert_bias(2).unwrap(), &bias[1..]);
    assert_eq!(
        t.set_expert_bias(2, &[]).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );

    // Backward with the input gradient into a sub-slice (hidden model).
    let hidden = hidden_model();
    let ht = Session::new(&hidden, Some(&options)).unwrap();
    ht.forward_hidden(&INPUT[5..], 1).unwrap();
    let mut grad = [9.0f32; 8];
    ht.backward(&[1.0; 5], Some(&mut grad[2..7])).unwrap();
    assert!(grad[2..7].iter().any(|&g| g != 9.0));
    assert_eq!((grad[1], grad[7]), (9.0, 9.0));

    // A model from bytes at an odd offset of a larger buffer, and from an empty slice.
    let file = std::fs::read(path("MOERT_TEST_HIDDEN_MODEL", "tiny_hidden.moert")).unwrap();
    let mut shifted = vec![0u8; file.len() + 3];
    shifted[3..].copy_from_slice(&file);
    assert_eq!(
        Model::from_bytes(&shifted[3..], None)
            .unwrap()
            .name()
            .unwrap(),
        "tiny-hidden"
    );
    assert!(Model::from_bytes(&[], None).is_err());
}
