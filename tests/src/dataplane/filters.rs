//! The ban pre-filter and the host filter (`wsguard_common::filter`) as a test fills them:
//! the writer's ordering rules by hand, for tests that write bans straight into the maps.

use anyhow::Result;
use aya::maps::{Array, MapData};
use std::net::IpAddr;
use wsguard_common::{filter, maps::names};

use super::DataPlane;

impl DataPlane {
    /// Mark every bucket of the ban pre-filter (`wsguard_common::filter`) of one family
    /// "proven clean", and for IPv4 every bit of the host filter. Call it before banning:
    /// [`DataPlane::ban`] then clears the buckets and bits each new ban covers, as the agent
    /// must.
    pub fn fill_filter(&mut self, v6: bool) -> Result<()> {
        let mut a: Array<&mut MapData, u64> = Array::try_from(self.map(names::BAN_FILTER)?)?;
        let base = if v6 {
            filter::FILTER_WORDS_PER_FAMILY
        } else {
            0
        };
        for i in 0..filter::FILTER_WORDS_PER_FAMILY {
            a.set(base + i, u64::MAX, 0)?;
        }
        if !v6 {
            self.fill_host_filter(u64::MAX)?;
        }
        Ok(())
    }

    fn fill_host_filter(&mut self, word: u64) -> Result<()> {
        let mut a: Array<&mut MapData, u64> = Array::try_from(self.map(names::HOST_FILTER)?)?;
        for i in 0..filter::HOST_FILTER_WORDS {
            a.set(i, word, 0)?;
        }
        Ok(())
    }

    /// Set or clear one host-filter bit (`host_bit` of `wsguard_common::filter`).
    pub fn set_host_bit(&mut self, bit: u32, clean: bool) -> Result<()> {
        let mut a: Array<&mut MapData, u64> = Array::try_from(self.map(names::HOST_FILTER)?)?;
        let (word, mask) = filter::host_slot(bit);
        let w = a.get(&word, 0)?;
        a.set(word, if clean { w | mask } else { w & !mask }, 0)?;
        Ok(())
    }

    /// Empty the pre-filter and the host filter (every bucket "maybe banned"), as fresh maps
    /// are.
    pub fn clear_filter(&mut self) -> Result<()> {
        self.clear_filter_family(false)?;
        self.clear_filter_family(true)?;
        self.fill_host_filter(0)
    }

    fn clear_filter_family(&mut self, v6: bool) -> Result<()> {
        let mut a: Array<&mut MapData, u64> = Array::try_from(self.map(names::BAN_FILTER)?)?;
        let base = if v6 {
            filter::FILTER_WORDS_PER_FAMILY
        } else {
            0
        };
        for i in 0..filter::FILTER_WORDS_PER_FAMILY {
            a.set(base + i, 0, 0)?;
        }
        Ok(())
    }

    /// Set or clear one pre-filter bucket (`bit` of `wsguard_common::filter`).
    pub fn set_filter_bit(&mut self, bit: u32, v6: bool, clean: bool) -> Result<()> {
        let mut a: Array<&mut MapData, u64> = Array::try_from(self.map(names::BAN_FILTER)?)?;
        let (word, mask) = filter::slot(bit, v6);
        let w = a.get(&word, 0)?;
        a.set(word, if clean { w | mask } else { w & !mask }, 0)?;
        Ok(())
    }

    /// Clear the pre-filter buckets a new ban covers (a no-op on an unfilled filter).
    pub(super) fn clear_filter_for(&mut self, ip: IpAddr, prefix: u32) -> Result<()> {
        match ip {
            IpAddr::V4(v4) => {
                let (first, count) = filter::v4_cidr_bits(v4.octets(), prefix);
                for bit in first..first + count {
                    self.set_filter_bit(bit, false, false)?;
                }
                if prefix == 32 {
                    self.set_host_bit(filter::host_bit(v4.octets()), false)?;
                }
            }
            IpAddr::V6(v6) => match filter::v6_cidr_bit(&v6.octets(), prefix) {
                Some(bit) => self.set_filter_bit(bit, true, false)?,
                None => self.clear_filter_family(true)?,
            },
        }
        Ok(())
    }
}
