//! `genbotcert -bot-hostname linux-riscv64-alice`: writes
//! `linux-riscv64-alice.key` (mode 0600) and `linux-riscv64-alice.csr`.

fn main() -> anyhow::Result<()> {
    botauth::cli::genbotcert(std::env::args_os())
}
