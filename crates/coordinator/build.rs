//! Rebuilds the crate when a migration is added, changed or removed:
//! `sqlx::migrate!` embeds `migrations/` at compile time, and cargo alone
//! tracks only the Rust sources, so a new migration would otherwise be left
//! out of the binary until some source changed.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
