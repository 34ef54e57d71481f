//! Communicators from Rust: a one-rank MPI job (the test runs without mpirun) attached to a
//! session, and NCCL's refusals without a GPU. One test for all of MPI: moert finalises MPI with
//! the last communicator, and MPI cannot be initialised twice in a process.

use moert::{Code, Communicator, Model, Profile, Session, SessionOptions, NCCL_UNIQUE_ID_BYTES};
use std::path::PathBuf;
use std::time::Duration;

fn model_path() -> PathBuf {
    match std::env::var_os("MOERT_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../examples/models/tiny_moe.moert"),
    }
}

#[test]
fn mpi_singleton_attached_to_a_session() {
    let mut options = SessionOptions::new().unwrap();
    {
        let comm = Communicator::mpi_with_timeout(std::time::Duration::from_secs(30)).unwrap();
        assert_eq!(comm.rank().unwrap(), 0);
        assert_eq!(comm.size().unwrap(), 1);
        comm.barrier().unwrap();
        assert_eq!(
            comm.set_timeout(Duration::ZERO).unwrap_err().code(),
            Code::INVALID_ARGUMENT
        );
        comm.set_timeout(Duration::from_secs(30)).unwrap();
        // One rank: the sum over ranks is the rank's own values, bit for bit, in place.
        let want = [1.5, -2.25, 3e300, f64::from_bits(1)];
        let mut data = want;
        comm.all_reduce_sum(&mut data).unwrap();
        assert_eq!(data.map(f64::to_bits), want.map(f64::to_bits));
        comm.all_reduce_sum(&mut []).unwrap();
        assert_eq!(
            options.communicator(Some(&comm), 2).unwrap_err().code(),
            Code::INVALID_ARGUMENT
        );
        options.communicator(Some(&comm), 1).unwrap();
    } // the options keep their reference
    let model = Model::load(model_path()).unwrap();
    {
        let session = Session::new(&model, Some(&options)).unwrap();
        assert_eq!(session.forward_tokens(&[1, 2, 3, 4], 1).unwrap().len(), 64);
        // Durations cannot be negative; all zero again after reset_metrics.
        session.profile().unwrap();
        session.reset_metrics().unwrap();
        assert_eq!(session.profile().unwrap(), Profile::default());
    }
    options.communicator(None, 1).unwrap(); // the last reference: MPI is finalised
    assert_eq!(Communicator::mpi().unwrap_err().code(), Code::INVALID_STATE);
    assert_eq!(Code::COMM.name(), "MOERT_ERR_COMM");
}

#[test]
fn nccl_refused_without_a_gpu() {
    assert_eq!(
        Communicator::nccl(&[0u8; 5], 0, 1, 0).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
    // A creation timeout out of range is refused before MPI or NCCL is touched.
    assert_eq!(
        Communicator::mpi_with_timeout(std::time::Duration::ZERO)
            .unwrap_err()
            .code(),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        Communicator::nccl_with_timeout(&[0u8; 128], 0, 1, 0, std::time::Duration::ZERO)
            .unwrap_err()
            .code(),
        Code::INVALID_ARGUMENT
    );
    // SAFETY: NULL is refused before anything is read.
    let null = unsafe { Communicator::mpi_from_raw(std::ptr::null()) };
    assert_eq!(null.unwrap_err().code(), Code::INVALID_ARGUMENT);
    let id = match Communicator::nccl_unique_id() {
        Ok(id) => id,
        Err(e) => {
            assert_eq!(e.code(), Code::UNSUPPORTED, "{e}");
            [0u8; NCCL_UNIQUE_ID_BYTES]
        }
    };
    match Communicator::nccl(&id, 0, 1, 0) {
        Ok(c) => assert_eq!(c.size().unwrap(), 1), // a GPU is here
        Err(e) => assert_eq!(e.code(), Code::UNSUPPORTED, "{e}"),
    }
}

#[test]
fn profile_of_a_session_alone_is_zero() {
    let model = Model::load(model_path()).unwrap();
    let session = Session::new(&model, None).unwrap();
    for _ in 0..2 {
        assert_eq!(session.profile().unwrap(), Profile::default());
        session
            .forward_tokens(&[1, 2, 3, 4, 5, 6, 7, 8], 2)
            .unwrap();
    }
}
