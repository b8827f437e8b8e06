//! The history a restarted agent reads back (`History::decode_into`, the payload of
//! `history.bin` once its envelope checks pass). Never a panic, and no allocation sized by an
//! untrusted count; a refusal names the byte it stopped at; what decodes re-encodes to a form
//! that decodes to itself.
#![no_main]

use headroom_agent::history::History;
use libfuzzer_sys::fuzz_target;

/// Small capacities keep each run fast; the code paths are those of the agent's defaults.
fn history() -> History {
    History::new(1000, 32, 60, 16)
}

fn encode(h: &History) -> Vec<u8> {
    let mut out = Vec::new();
    h.write_to(&mut out).expect("writing to a Vec");
    out
}

fuzz_target!(|data: &[u8]| {
    let mut h = history();
    match h.decode_into(data) {
        Ok(n) => {
            assert_eq!(n, h.len());
            let once = encode(&h);
            let mut again = history();
            again
                .decode_into(&once)
                .expect("the agent's own encoding decodes");
            assert_eq!(encode(&again), once, "re-encoding is stable");
        }
        Err(e) => assert!(e.to_string().contains("byte"), "{e}"),
    }
});
