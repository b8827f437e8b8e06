//! What the aggregator does with the body of `POST /v1/hints`: `decode_batch` on untrusted bytes.
//! Never a panic; a refusal names what was wrong (a field path for an invalid value); a batch
//! that is accepted is valid and survives a trip through its wire form unchanged.
#![no_main]

use headroom_protocol::schema::{SchemaError, decode_batch, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode_batch(data) {
        Ok(batch) => {
            validate(&batch).expect("an accepted batch is valid");
            let wire = serde_json::to_vec(&batch).expect("a batch encodes");
            let again = decode_batch(&wire).expect("an encoded batch decodes");
            assert_eq!(again, batch, "round trip");
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            match e {
                SchemaError::Invalid { field, reason } => {
                    assert!(
                        !field.is_empty() && !reason.is_empty(),
                        "{field:?}: {reason:?}"
                    )
                }
                SchemaError::Malformed(why) => assert!(!why.is_empty()),
                SchemaError::UnsupportedSchema { .. } => {}
            }
        }
    }
});
