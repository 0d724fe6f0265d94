// The migrations are embedded by `sqlx::migrate!`, which cannot tell
// Cargo to watch the folder, so a new migration would otherwise leave an
// incremental build with the old set.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
