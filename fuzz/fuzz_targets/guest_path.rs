//! Path normalization in the guest's file tools (`files::check_path`): any string. An accepted
//! path is absolute, has no `..`, no NUL, fits the limit, and is accepted again unchanged; a
//! refusal says why.
#![no_main]

use std::path::Component;

use libfuzzer_sys::fuzz_target;
use moat_guest::files::check_path;
use moat_tools::guest::MAX_PATH;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    match check_path(path) {
        Ok(checked) => {
            assert!(checked.is_absolute(), "{path:?}");
            assert!(!checked.components().any(|c| c == Component::ParentDir), "{path:?}");
            assert!(!path.contains('\0') && path.len() <= MAX_PATH, "{path:?}");
            let again = check_path(checked.to_str().expect("UTF-8 in, UTF-8 out")).expect("accepted again");
            assert_eq!(again, checked);
        }
        Err(why) => assert!(!why.is_empty()),
    }
});
