//! Everything an SMTP client controls, through the SMTP session, the MIME parser and the
//! authentication parser: nothing may panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gatehouse_channels::email::fuzz::fuzz_one(data);
});
