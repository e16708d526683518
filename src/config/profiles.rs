//! Device profiles: the TOML files in `firmware-config/`, embedded in the
//! binary so `--profile NAME` works on a board with nothing but the binary.
//! A unit test checks that every file in that directory is listed here.

/// (name, TOML text) of every embedded profile.
pub const PROFILES: &[(&str, &str)] = &[
    ("dev", include_str!("../../firmware-config/dev.toml")),
    (
        "gateway-256m",
        include_str!("../../firmware-config/gateway-256m.toml"),
    ),
    (
        "pi-zero-2w",
        include_str!("../../firmware-config/pi-zero-2w.toml"),
    ),
    ("pi4-sd", include_str!("../../firmware-config/pi4-sd.toml")),
    (
        "pi5-nvme",
        include_str!("../../firmware-config/pi5-nvme.toml"),
    ),
];

/// The TOML text of an embedded profile.
pub fn profile_text(name: &str) -> Option<&'static str> {
    PROFILES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Names of the embedded profiles, for help and error messages.
pub fn profile_names() -> Vec<&'static str> {
    PROFILES.iter().map(|(n, _)| *n).collect()
}
